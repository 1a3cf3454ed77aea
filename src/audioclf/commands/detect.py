"""``audioclf tag``, ``audioclf detect`` (with ``--tune`` and ``--plot``) and ``audioclf evaluate-events``:
the commands around :mod:`audioclf.audioset`, :mod:`audioclf.events` and :mod:`audioclf.eventmetrics`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import AudioclfError
from ..events import (DetectConfig, check_ignore, find_events, probability_track, read_config_file, read_events,
                      model_settings, save_config, tune, write_events)
from ..fileio import write_text_atomic
from ..options import PredictOptions
from .predict import collect_paths

log = logging.getLogger(__name__)

PLOT_CLASSES = 5  # tracks drawn per plot: the classes that reach the highest probability
PLOT_COLUMNS = 3000  # most spectrogram columns in a plot, whatever the recording's length


def load_detector(model, *, weights: Optional[str] = None, device: str = PredictOptions.device,
                  batch_size: int = PredictOptions.batch_size):
    """A Classifier from a saved model or an AudioSet backbone's name (``weights``: its local file)."""
    from ..predict import load

    try:
        return load(model, device, batch_size=batch_size, weights_path=weights)
    except AudioclfError as e:
        raise AudioclfError(str(e).replace("weights_path is", "--weights is")) from None


def run_tag(paths: Sequence, *, backbone: str, weights: Optional[str], out: Optional[str],
            top_k: int = PredictOptions.top_k, device: str = PredictOptions.device,
            batch_size: int = PredictOptions.batch_size, quiet: bool = False) -> int:
    """Print (and with ``out``, write as ``path,rank,label,prob`` CSV) the top AudioSet tags of each file."""
    from ..audioset import tagging_backbones

    if out is not None and Path(out).suffix.lower() != ".csv":
        raise AudioclfError(f"--out {out}: tags are written as CSV; name a .csv file")
    if backbone not in tagging_backbones() or Path(backbone).exists():
        raise AudioclfError(f"--backbone {backbone}: choose one of {', '.join(tagging_backbones())}")
    clf = load_detector(backbone, weights=weights, device=device, batch_size=batch_size)
    rows, failed = [], 0
    for r in clf.classify_files(collect_paths(paths), top_k=top_k, quiet=quiet):
        if r["error"]:
            print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
            failed += 1
            continue
        print(f"{r['path']}: " + "; ".join(f"{t['label']} {t['prob']:.2f}" for t in r["top_k"]))
        rows += [(r["path"], rank, t["label"], f"{t['prob']:.4f}") for rank, t in enumerate(r["top_k"], 1)]
    if out is not None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("path", "rank", "label", "prob"))
        writer.writerows(rows)
        write_text_atomic(Path(out), buf.getvalue())
    return 1 if failed else 0


def detect_config(model, clf, params: Optional[str], overrides: dict) -> DetectConfig:
    """Flags over ``--params FILE`` over the settings saved with the model over its task's defaults."""
    saved = read_config_file(params) if params and Path(params).is_file() else \
        model_settings(model, clf.config.train.task)
    return DetectConfig.from_dict({**asdict(DetectConfig()), **saved, **overrides})


def run_detect(model, inputs: Sequence, *, out: Optional[str], tune_on: Optional[Sequence[str]] = None,
               ignore: Sequence[str] = (), plot_dir: Optional[str] = None, params: Optional[str] = None,
               overrides: Optional[dict] = None, weights: Optional[str] = None, device: str = PredictOptions.device,
               batch_size: int = PredictOptions.batch_size, quiet: bool = False) -> int:
    """``audioclf detect``: tune the post-processing on validation recordings, then detect events in
    ``inputs`` and write them to ``out`` (DCASE TSV)."""
    if inputs and not out:
        raise AudioclfError("--out is required with INPUTS: the event list to write (events.tsv)")
    if not inputs and not tune_on:
        raise AudioclfError("give INPUTS to detect events in, or --tune VAL_AUDIO VAL_EVENTS.tsv, or both")
    clf = load_detector(model, weights=weights, device=device, batch_size=batch_size)
    ignore = check_ignore(ignore, clf.labels)
    overrides = overrides or {}
    config = detect_config(model, clf, params, overrides)
    if tune_on:
        config = _tune(clf, model, config, tune_on, ignore, params, quiet)
    if not inputs:
        return 0
    events, failed = [], 0
    paths = collect_paths(inputs)
    for path in tqdm(paths, desc="detect", unit="file", disable=True if quiet else None):
        try:
            duration_s, track = probability_track(clf, str(path), config)
        except AudioclfError as e:  # one unreadable file must not lose the others' events
            log.warning("%s", e)
            failed += 1
            continue
        found = find_events(track, clf.labels, config, filename=Path(path).name, duration_s=duration_s, ignore=ignore)
        events += found
        if plot_dir is not None:
            plot_detection(path, duration_s, track, clf.labels, found, config, Path(plot_dir) / f"{Path(path).stem}.png",
                           ignore=ignore)
    write_events(events, out)
    print(f"{len(events)} events in {len(paths) - failed} files: {out}" + (f" ({failed} unreadable)" if failed else ""))
    return 1 if failed else 0


def _tune(clf, model, config: DetectConfig, tune_on: Sequence[str], ignore, params, quiet) -> DetectConfig:
    from ..audioset import is_backbone_name

    if params is None and is_backbone_name(model):
        raise AudioclfError(f"{model} is a pretrained backbone, not a run: name a file for the tuned settings with "
                            f"--params detect.json (and pass it again when detecting)")
    audio, events_tsv = tune_on
    paths = collect_paths([audio])
    names = [Path(p).name for p in paths]
    reference = [e._replace(filename=Path(e.filename).name) for e in read_events(events_tsv)]
    unknown = sorted({e.filename for e in reference} - set(names))
    if unknown:
        raise AudioclfError(f"{events_tsv}: events of {len(unknown)} file(s) not in {audio}, e.g. {unknown[0]}")
    if not reference:
        raise AudioclfError(f"{events_tsv}: no events to tune on")
    tracks = {name: probability_track(clf, str(p), config)
              for name, p in tqdm(list(zip(names, paths)), desc="tracks", unit="file", disable=True if quiet else None)}
    best, metrics = tune(tracks, clf.labels, reference, config, ignore=ignore, quiet=quiet)
    written = save_config(best, None if params else model, params)
    print(f"tuned on {len(paths)} files: event F1 {metrics['event_f1']:.3f}, segment F1 {metrics['segment_f1']:.3f} "
          f"with {json.dumps(asdict(best))}; saved in {', '.join(map(str, written))}")
    return best


def run_evaluate_events(reference: str, estimated: str, out: Optional[str] = None) -> int:
    """``audioclf evaluate-events``: print the table, write the metrics as JSON."""
    from ..eventmetrics import evaluate_events, table

    metrics = evaluate_events(read_events(reference), read_events(estimated))
    print(table(metrics))
    if out:
        write_text_atomic(Path(out), json.dumps(metrics, indent=2) + "\n")
        print(f"metrics: {out}")
    return 0


# ---------------------------------------------------------------------------------------------- plot

def _spectrogram(path, duration_s: float, sample_rate: int = 16000, n_mels: int = 64) -> np.ndarray:
    """A log-mel image of the whole file in dB below its peak (floor -80), ``(n_mels, <= PLOT_COLUMNS)``,
    streamed block by block."""
    from ..audio import stream_audio
    from ..features import mel_filterbank

    hop = max(256, int(np.ceil(duration_s * sample_rate / PLOT_COLUMNS)) // 256 * 256 or 256)
    n_fft = max(1024, hop)
    fb, window = mel_filterbank(sample_rate, n_fft, n_mels, 0.0, None), np.hanning(n_fft + 1)[:-1]  # periodic Hann
    cols = []
    for block in stream_audio(path, sample_rate, block_s=max(30.0, 64 * hop / sample_rate)):
        if len(block) >= n_fft:
            frames = np.lib.stride_tricks.sliding_window_view(block, n_fft)[::hop]  # (frames, n_fft)
            cols.append(fb @ (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).T)
    mel = np.concatenate(cols, axis=1) if cols else np.zeros((n_mels, 1))
    db = 10 * np.log10(mel + 1e-10)
    return np.maximum(db - db.max(), -80.0)


def plot_detection(path, duration_s: float, track: np.ndarray, labels: Sequence[str], events, config: DetectConfig,
                   out_png, *, ignore: Sequence[str] = ()) -> Path:
    """A PNG: the spectrogram with the detected events as bars, above the probability tracks of the
    classes that reach the highest probabilities (thresholds dashed)."""
    from matplotlib.figure import Figure

    shown = [c for c in np.argsort(-track.max(axis=0)) if labels[c] not in ignore][:PLOT_CLASSES]
    names = sorted({e.event_label for e in events} | {labels[c] for c in shown})
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig = Figure(figsize=(12, 6), layout="constrained")
    ax_spec, ax_track = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    ax_spec.imshow(_spectrogram(path, duration_s), origin="lower", aspect="auto", cmap="magma",
                   extent=(0, duration_s, 0, 64))
    for e in events:
        row = names.index(e.event_label)
        ax_spec.broken_barh([(e.onset, e.offset - e.onset)], (60 - 4 * (row % 14), 3), color=colours[e.event_label],
                            alpha=0.9)
    ax_spec.set(ylabel="mel band", title=f"{Path(path).name}: {len(events)} events")
    t = (np.arange(len(track)) + 0.5) * config.hop_s
    for c in shown:
        ax_track.plot(t, track[:, c], color=colours[labels[c]], label=labels[c], linewidth=1)
    for y in (config.onset_threshold, config.offset_threshold):
        ax_track.axhline(y, color="grey", linestyle="--", linewidth=0.8)
    ax_track.set(xlabel="time (s)", ylabel="probability", ylim=(0, 1.02), xlim=(0, duration_s))
    ax_track.legend(loc="upper right", fontsize=8, ncol=min(PLOT_CLASSES, 3))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
