"""Sound event detection: per-class probability tracks on a fine time grid, and events with onsets and
offsets from them.

A track comes from one of two sources (``DetectConfig.source``):

- ``frames``: the network's last feature map, the head applied to each of its time steps (32 spectrogram
  frames) instead of to their average; blocks of ``block_s`` (10 s) overlapping by half the training
  length, each grid point read from the block whose centre is nearest, so it keeps at least a quarter of
  the training length of context on either side.
- ``windows``: short sliding windows (``window_s``) every ``hop_s``, each window's probabilities placed at
  its centre.

Either way the points are interpolated onto a grid of ``hop_s`` and the file streams through
:meth:`audioclf.predict.Classifier.window_steps` (predict's memory bounds). Post-processing, per class:
median filter -> hysteresis (an event is a run above ``offset_threshold`` that reaches ``onset_threshold``)
-> runs less than ``merge_gap_s`` apart merged -> events shorter than ``min_duration_s`` dropped. Its
settings are chosen on validation data (:func:`tune`) and saved with the model: ``detect.json`` in the run
directory and the checkpoint's ``"detect"`` key.

Events are DCASE rows: ``filename onset offset event_label score`` (seconds, tab-separated).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Optional, Sequence

import numpy as np

from .config import _check_settings, setting
from .errors import AudioclfError
from .fileio import write_text_atomic

log = logging.getLogger(__name__)

PARAMS_FILE = "detect.json"  # in a run directory
# The post-processing a trained model without tuned settings gets, by its task, over DetectConfig's defaults
# (tuned for a multiclass mn04_as): a tagger's sigmoid tracks stand lower than a softmax's and need no median
# filter. Chosen by `tune` on soundscapes of ESC-50 folds 1-3 for mn04_as trained with the multilabel recipe
# (docs/events.md): event-based F1 0.266 -> 0.303 there.
TASK_DEFAULTS = {"multilabel": {"onset_threshold": 0.4, "offset_threshold": 0.4, "median_s": 0.0}}
CHECKPOINT_KEY = "detect"
TSV_COLUMNS = ("filename", "onset", "offset", "event_label", "score")


@dataclass
class DetectConfig:
    """How probability tracks are made and turned into events; saved with a model by ``detect --tune``.

    The post-processing defaults are the ones ``tune`` chose for a multiclass ``mn04_as`` on soundscapes of
    ESC-50 clips (docs/events.md); a model's own tuned settings replace them."""

    SECTION = "detect"  # not part of RunConfig: it is chosen after training, on validation recordings

    source: Literal["frames", "windows"] = setting(
        "frames", help="frames: the network's frame-level map before pooling; windows: short sliding windows")
    hop_s: float = setting(0.1, help="s between points of the probability tracks", low=0.01, high=1.0)
    window_s: float = setting(1.0, help="s per sliding window (source windows)", low=0.1, high=60.0)
    block_s: float = setting(10.0, help="s of audio per forward pass (source frames; at least the training "
                                        "length): longer blocks overlap less", low=1.0, high=60.0)
    median_s: float = setting(0.5, help="s of the per-class median filter (0 = off)", low=0.0, high=10.0)
    onset_threshold: float = setting(0.5, help="an event starts where a track reaches this probability",
                                     low=0.0, high=1.0, low_open=True)
    offset_threshold: float = setting(0.25, help="and lasts while the track stays at or above this one "
                                                "(<= onset threshold)", low=0.0, high=1.0, low_open=True)
    min_duration_s: float = setting(0.6, help="s: shorter events are dropped", low=0.0, high=60.0)
    merge_gap_s: float = setting(4.0, help="s: events of one class closer than this are merged", low=0.0,
                                 high=60.0)

    def __post_init__(self):
        _check_settings(self)
        if self.offset_threshold > self.onset_threshold:
            raise AudioclfError(f"offset_threshold={self.offset_threshold:g} is above onset_threshold="
                                f"{self.onset_threshold:g}: the offset threshold must be the lower one")

    @classmethod
    def from_dict(cls, d: dict, source="the detect settings") -> "DetectConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AudioclfError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


class Event(NamedTuple):
    filename: str
    onset: float  # s
    offset: float  # s
    event_label: str
    score: float  # the highest smoothed probability within the event


# ---------------------------------------------------------------------------------------------- tracks

def interp_rows(t: np.ndarray, rows: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``rows`` ``(n, C)`` at sorted times ``t`` onto ``grid``, held at the ends."""
    if len(t) == 1:
        return np.repeat(rows, len(grid), axis=0)
    i = np.clip(np.searchsorted(t, grid), 1, len(t) - 1)
    w = np.clip((grid - t[i - 1]) / np.maximum(t[i] - t[i - 1], 1e-9), 0.0, 1.0)[:, None]
    return rows[i - 1] * (1 - w) + rows[i] * w


def grid_times(duration_s: float, hop_s: float) -> np.ndarray:
    """Centres of the track's cells: cell ``k`` covers ``[k hop_s, (k + 1) hop_s)``."""
    return (np.arange(max(1, int(np.ceil(duration_s / hop_s - 1e-9)))) + 0.5) * hop_s


def step_times(n_steps: int, window_s: float, frame_hop_s: Optional[float] = None) -> np.ndarray:
    """Times (s from the window's start) of the ``n_steps`` points of a frame-level row.

    With ``frame_hop_s`` (the spectrogram's hop), step ``k`` of a network that downsamples time by ``S``
    covers spectrogram frames ``kS .. kS + S - 1`` and sits at their middle; ``S`` is the ratio of frames
    to steps rounded up (the last step also covers the padding), and frame ``n`` is centred at
    ``n frame_hop_s``. Without it, the steps are spread evenly over the window: 32-frame steps of 10 ms
    frames then fall 0.2 s early at the end of a 10-s window.
    """
    k = np.arange(n_steps)
    if frame_hop_s is None or n_steps == 1:
        return (k + 0.5) * window_s / n_steps
    frames = 1 + int(round(window_s / frame_hop_s))
    stride = -(-frames // n_steps)
    return (k * stride + (stride - 1) / 2) * frame_hop_s


def track_from_rows(starts: Sequence[int], rows: Sequence[np.ndarray], window_s: float, sample_rate: int,
                    duration_s: float, hop_s: float, *, frame_hop_s: Optional[float] = None) -> np.ndarray:
    """The model's outputs for windows starting at ``starts`` (samples) as one track ``(cells, n_classes)``.

    ``rows`` are ``(n_classes,)`` per window (placed at its centre) or ``(steps, n_classes)`` (frame-level,
    at :func:`step_times`, which ``frame_hop_s`` makes exact); of overlapping windows, each time takes the
    points of the window whose centre is nearest, where the network saw the most context.
    """
    starts = np.asarray(starts, float) / sample_rate
    centres = starts + window_s / 2
    bounds = np.concatenate([[-np.inf], (centres[1:] + centres[:-1]) / 2, [np.inf]])
    t_all, r_all = [], []
    for i, (start, row) in enumerate(zip(starts, rows)):
        row = np.atleast_2d(row)
        t = start + step_times(len(row), window_s, frame_hop_s)
        keep = (t >= bounds[i]) & (t < bounds[i + 1]) & (t <= max(duration_s, t[0]))
        t_all.append(t[keep])
        r_all.append(row[keep])
    t, r = np.concatenate(t_all), np.concatenate(r_all)
    order = np.argsort(t, kind="stable")
    return interp_rows(t[order], r[order], grid_times(duration_s, hop_s)).astype(np.float32)


def track_steps(clf, audio, config: DetectConfig, **limits) -> Iterator[Optional[tuple]]:
    """``clf``'s probability track of one input, one forward pass at a time: yields ``None`` after each
    batch, then ``(name, duration_s, track)``. ``limits`` go to ``Classifier.window_steps``."""
    f, frames = clf.config.features, config.source == "frames"
    window_s, hop_s = frame_blocks(audio, f, config.block_s) if frames else (config.window_s, config.hop_s)
    for source in clf.window_steps(audio, window_s=window_s, hop_s=hop_s, frames=frames, **limits):
        if source is None:
            yield None
            continue
        yield source.name, source.duration_s, track_from_rows(
            source.starts, source.rows, window_s, f.sample_rate, source.duration_s, config.hop_s,
            frame_hop_s=f.hop_length / f.sample_rate if frames else None)


def frame_blocks(audio, features, block_s: float) -> tuple[float, float]:
    """``(window_s, hop_s)`` of the frame-level blocks of ``audio`` (a path, or a waveform at
    ``features.sample_rate``): ``block_s``, but no longer than the input and no shorter than the training
    length; consecutive blocks overlap by half the training length."""
    from .audio import audio_duration_s

    if isinstance(audio, (str, os.PathLike)):
        length_s = audio_duration_s(audio)
    else:
        length_s = np.shape(audio)[-1] / features.sample_rate
    window_s = max(features.duration_s, min(block_s, length_s))
    return window_s, window_s - features.duration_s / 2


def probability_track(clf, audio, config: DetectConfig) -> tuple[float, np.ndarray]:
    """``(duration_s, track)`` of one input (path or waveform): ``track`` is ``(cells, n_classes)``, cell
    ``k`` the probabilities around ``(k + 0.5) hop_s``."""
    *_, (name, duration_s, track) = track_steps(clf, audio, config)
    return duration_s, track


# ---------------------------------------------------------------------------------------------- events

def _runs(mask: np.ndarray) -> np.ndarray:
    """``(n, 2)`` start and end (exclusive) indices of the runs of True in ``mask``."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(d == 1), np.flatnonzero(d == -1)], axis=1)


def median_cells(config: DetectConfig) -> int:
    """The median filter's length in track cells: ``median_s`` rounded to an odd number."""
    return int(round(config.median_s / config.hop_s)) // 2 * 2 + 1


def smooth(track: np.ndarray, config: DetectConfig) -> np.ndarray:
    """The per-class median filter of ``median_s`` (:func:`median_cells`)."""
    k = median_cells(config)
    if k <= 1 or len(track) < 2:
        return track
    from scipy.ndimage import median_filter

    return median_filter(track, size=(k, 1), mode="nearest")


def find_events(track: np.ndarray, labels: Sequence[str], config: DetectConfig, *, filename: str,
                duration_s: float, ignore: Sequence[str] = (), smoothed: bool = False) -> list[Event]:
    """The events in ``track`` ``(cells, n_classes)``, sorted by onset.

    Args:
        labels (list of str): class names, ``track``'s columns.
        config (DetectConfig): the post-processing settings.
        filename (str): what the events' ``filename`` says.
        duration_s (float): the recording's length; no offset is later.
        ignore (list of str, optional): classes never reported (background such as rain). (Default: none)
        smoothed (bool, optional): ``track`` is already median-filtered. (Default: ``False``)
    """
    p = track if smoothed else smooth(track, config)
    hop, gap, out = config.hop_s, int(round(config.merge_gap_s / config.hop_s)), []
    for c in np.flatnonzero(p.max(axis=0, initial=0.0) >= config.onset_threshold):
        if labels[c] in ignore:
            continue
        runs = [r for r in _runs(p[:, c] >= config.offset_threshold) if p[r[0]:r[1], c].max() >= config.onset_threshold]
        merged: list[list[int]] = []
        for a, b in runs:
            if merged and a - merged[-1][1] <= gap:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        for a, b in merged:
            onset, offset = float(a * hop), float(min(b * hop, duration_s))
            if offset - onset >= config.min_duration_s - 1e-9:
                out.append(Event(filename, round(onset, 3), round(offset, 3), labels[c], round(float(p[a:b, c].max()), 4)))
    return sorted(out, key=lambda e: (e.onset, e.event_label))


def check_ignore(ignore: Sequence[str], labels: Sequence[str]) -> list[str]:
    """``ignore`` (class names) checked against the model's classes."""
    unknown = [x for x in ignore if x not in labels]
    if unknown:
        raise AudioclfError(f"--ignore {','.join(unknown)}: not among the model's classes "
                            f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")
    return list(ignore)


# ---------------------------------------------------------------------------------------------- files

def write_events(events: Sequence[Event], path) -> None:
    """A DCASE event list: a header, then one tab-separated row per event."""
    lines = ["\t".join(TSV_COLUMNS)] + [f"{e.filename}\t{e.onset:.3f}\t{e.offset:.3f}\t{e.event_label}\t{e.score:.4f}"
                                        for e in events]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")


def read_events(path) -> list[Event]:
    """A DCASE event list (TSV, with or without the header and the ``score`` column; rows with no event
    label, a file with no events, are kept out). Times in seconds."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise AudioclfError(f"{path}: cannot read the event list ({e.strerror})") from None
    rows = [r for r in csv.reader(lines, delimiter="\t") if r and any(r)]
    if rows and rows[0][:2] == ["filename", "onset"]:
        rows = rows[1:]
    out = []
    for n, r in enumerate(rows, 1):
        if len(r) == 1 or (len(r) >= 4 and not r[3]):
            continue  # a file listed without events
        try:
            onset, offset = float(r[1]), float(r[2])
            score = float(r[4]) if len(r) > 4 and r[4] != "" else 1.0
            if not (0 <= onset <= offset and np.isfinite(offset)) or len(r) < 4:
                raise ValueError
        except (ValueError, IndexError):
            raise AudioclfError(f"{path}: row {n} ({' '.join(r)[:80]!r}) is not 'filename onset offset event_label "
                                f"[score]' with 0 <= onset <= offset in seconds") from None
        out.append(Event(r[0], onset, offset, r[3], score))
    return out


def saved_config(model) -> Optional[dict]:
    """The detect settings saved with ``model``: a run directory's ``detect.json``, or a checkpoint's
    ``"detect"`` key; None when it has none (or is an AudioSet backbone's name)."""
    from .audioset import is_backbone_name
    from .checkpoint import is_safetensors_export, load_checkpoint

    if is_backbone_name(model) or is_safetensors_export(model):
        return None
    p = Path(model)
    if p.is_dir() and (p / PARAMS_FILE).is_file():
        return read_config_file(p / PARAMS_FILE)
    return load_checkpoint(p).get(CHECKPOINT_KEY)


def model_settings(model, task: str) -> dict:
    """The detect settings of ``model`` (a path, an AudioSet backbone's name, or a loaded Classifier, which
    has none saved) before flags: those tuned and saved with it, else its ``task``'s defaults
    (:data:`TASK_DEFAULTS`); an AudioSet backbone's name, never tuned as a tagger, gets DetectConfig's own."""
    from .audioset import is_backbone_name

    saved = saved_config(model) if isinstance(model, (str, os.PathLike)) else None
    if saved:
        return saved
    defaults = {} if is_backbone_name(model) else dict(TASK_DEFAULTS.get(task, {}))
    log.info("no tuned detect settings saved with %s: the defaults%s (tune them with detect --tune)", model,
             f" for {task} models" if defaults else "")
    return defaults


def read_config_file(path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AudioclfError(f"{path}: not a readable JSON file of detect settings ({e})") from None
    if not isinstance(d, dict):
        raise AudioclfError(f"{path}: must hold a JSON object of detect settings")
    DetectConfig.from_dict(d, path)
    return d


def save_config(config: DetectConfig, model=None, path=None) -> list[Path]:
    """Save tuned settings: to ``path`` when given, else with ``model`` (a run directory's ``detect.json``
    and its ``best.pt``, or a ``.pt`` checkpoint's ``"detect"`` key). Returns the files written."""
    from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

    text = json.dumps(asdict(config), indent=2) + "\n"
    if path is not None:
        write_text_atomic(Path(path), text)
        return [Path(path)]
    written = []
    if Path(model).is_dir():
        write_text_atomic(Path(model) / PARAMS_FILE, text)
        written.append(Path(model) / PARAMS_FILE)
    ckpt_path = resolve_checkpoint(model)
    ckpt = load_checkpoint(ckpt_path)
    ckpt[CHECKPOINT_KEY] = asdict(config)
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version")}, ckpt_path)
    return written + [ckpt_path]


# ---------------------------------------------------------------------------------------------- tuning

# the post-processing grid searched by tune(); the track source and hop are fixed by the caller
TUNE_GRID = {
    "onset_threshold": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    "offset_ratio": (0.5, 0.75, 1.0),  # offset_threshold = ratio * onset_threshold
    # frame-level tracks of long sounds peak at their onsets and sag after: long filters and gaps pay off
    "median_s": (0.0, 0.5, 1.5, 2.5),
    "min_duration_s": (0.1, 0.3, 0.6),
    "merge_gap_s": (0.0, 0.5, 2.0, 4.0),
}


def tune(tracks: dict, labels: Sequence[str], reference: Sequence[Event], config: DetectConfig, *,
         ignore: Sequence[str] = (), quiet: bool = False) -> tuple[DetectConfig, dict]:
    """The post-processing settings that score best on validation recordings.

    Args:
        tracks (dict): filename -> ``(duration_s, track)`` (:func:`probability_track`, made with
            ``config``'s source and hop).
        labels (list of str): the tracks' columns.
        reference (list of Event): the true events of those files.
        config (DetectConfig): the starting settings (source, hop and window are kept).

    The objective is the mean of event-based F1 and segment-based F1 (:mod:`audioclf.eventmetrics`), over
    :data:`TUNE_GRID`. Returns the best settings and their metrics.
    """
    from tqdm.auto import tqdm

    from .eventmetrics import Scorer

    scorer = Scorer(reference, {name: d for name, (d, _) in tracks.items()})
    best, best_score, best_metrics = config, -1.0, {}
    smoothed = {}
    keys = list(TUNE_GRID)
    combos = list(itertools.product(*TUNE_GRID.values()))
    for values in tqdm(combos, desc="tune", unit="setting", disable=True if quiet else None):
        v = dict(zip(keys, values))
        cand = replace(config, onset_threshold=v["onset_threshold"], median_s=v["median_s"],
                       offset_threshold=round(v["offset_ratio"] * v["onset_threshold"], 4),
                       min_duration_s=v["min_duration_s"], merge_gap_s=v["merge_gap_s"])
        events = []
        for name, (duration_s, track) in tracks.items():
            key = (name, cand.median_s)
            if key not in smoothed:
                smoothed[key] = smooth(track, cand)
            events += find_events(smoothed[key], labels, cand, filename=name, duration_s=duration_s, ignore=ignore,
                                  smoothed=True)
        m = scorer.score(events)
        score = (m["event_f1"] + m["segment_f1"]) / 2
        if score > best_score + 1e-9:
            best, best_score, best_metrics = cand, score, m
    return best, best_metrics
