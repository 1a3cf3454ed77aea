"""Inference: one path from audio to class probabilities, used by the Python API, ``audioclf predict``,
``audioclf evaluate`` and the HTTP server.

A clip up to the training duration is padded exactly as in training (``audio.fix_length``); a longer one
is cut into sliding windows and gets the mean of the window probabilities. Long files are streamed block
by block, so memory stays bounded whatever their length. Windows of many inputs share model batches.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
import tempfile
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import (AUDIO_EXTENSIONS, CROP_SLACK, audio_duration_s, default_hop, find_audio_files, fix_length, load_audio,
                    resample, stream_audio)
from .checkpoint import load_model
from .fileio import atomic_path
from .config import AudioclfError, FeatureConfig, RunConfig
from .model import WaveformClassifier
from .runtime import auto_workers, resolve_device

log = logging.getLogger(__name__)


class LimitError(AudioclfError):
    """An input passed a limit its caller set (``max_duration_s``, ``max_windows``): the server answers 413."""


# ---------------------------------------------------------------------------------------------- windows

def sliding_windows(blocks: Iterable[np.ndarray], window: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """Cut consecutive 1-D blocks of one recording into windows, assembled across block boundaries.

    Args:
        blocks (iterable of np.ndarray): consecutive pieces of the recording, any lengths.
        window (int): samples per window.
        hop (int): samples between window starts.

    Yields ``(start sample, window)`` every ``hop`` samples; when the last of them stops short of the end,
    one more window ends exactly at the end, so every sample is seen. A recording shorter than ``window``
    gives one zero-padded window. Memory holds one block plus one window.
    """
    buf, buf_start, next_start, covered = np.zeros(0, np.float32), 0, 0, 0
    for block in blocks:
        buf = np.concatenate([buf, block])
        while next_start + window <= buf_start + len(buf):
            yield next_start, buf[next_start - buf_start:next_start - buf_start + window]
            covered, next_start = next_start + window, next_start + hop
        # keep what the next window, or a final end-aligned one, can still need
        keep_from = max(buf_start, min(next_start, buf_start + len(buf) - window))
        buf, buf_start = buf[keep_from - buf_start:], keep_from
    total = buf_start + len(buf)
    if total < window and covered == 0:
        yield 0, fix_length(buf, window)
    elif covered < total:
        yield total - window, buf[len(buf) - window:]


def count_windows(n_samples: int, window: int, hop: int) -> int:
    """How many windows :func:`prepare` (and ``audio.inference_windows``) gives a recording of ``n_samples``
    samples, without decoding it."""
    if n_samples <= window * (1 + CROP_SLACK):
        return 1
    regular = (n_samples - window) // hop + 1
    return regular + ((regular - 1) * hop + window < n_samples)  # the end-aligned last window


def _limited(windows: Iterable[tuple[int, np.ndarray]], name: str, window: int, sample_rate: int,
             max_duration_s: Optional[float], max_windows: Optional[int]) -> Iterator[tuple[int, np.ndarray]]:
    """``windows``, stopped with a LimitError as soon as they pass ``max_windows`` or reach past
    ``max_duration_s``: counted as the audio decodes, so a file whose header understates its length is
    stopped one decoding block past the limit."""
    max_end = None if max_duration_s is None else int(max_duration_s * sample_rate)
    for n, (start, w) in enumerate(windows, 1):
        if max_windows is not None and n > max_windows:
            raise LimitError(f"{name}: more than max_windows={max_windows} windows; use a longer hop_s or "
                             f"window_s, or a shorter file")
        # a window starting past 0 is all decoded audio; the first one may be zero padding
        if max_end is not None and start > 0 and start + window > max_end:
            raise LimitError(f"{name}: longer than the limit of {max_duration_s:g} s of audio")
        yield start, w


class _FileWindows:
    """The windows of a long file, streamed when iterated. Holds only the path, so a loader worker can
    hand it to the main process, which then reads the file while the model runs."""

    def __init__(self, path: str, sample_rate: int, window: int, hop: int):
        self.path, self.sample_rate, self.window, self.hop = path, sample_rate, window, hop

    def _blocks(self) -> Iterator[np.ndarray]:
        for block in stream_audio(self.path, self.sample_rate):
            if not np.isfinite(block).all():
                raise AudioclfError(f"{self.path}: the audio holds NaN or infinite samples")
            yield block

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return sliding_windows(self._blocks(), self.window, self.hop)


@dataclass
class _Source:
    """One input made ready for the model: its windows (a list, or a lazy stream) or why it failed."""

    name: str  # file path, or "<array>"
    duration_s: float
    windows: Iterable[tuple[int, np.ndarray]] = ()  # (start sample, window of `window` samples)
    error: Optional[Exception] = None
    starts: list[int] = field(default_factory=list)  # filled in as the windows pass through the model
    probs: list[np.ndarray] = field(default_factory=list)


def as_waveform(audio, sample_rate: Optional[int], target_sr: int) -> np.ndarray:
    """A numpy array or torch tensor, ``(time,)`` or ``(channels, time)`` in [-1, 1] at ``sample_rate`` Hz
    (``None`` = ``target_sr``), as mono float32 at ``target_sr``."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    if not isinstance(audio, np.ndarray):
        raise AudioclfError(f"Unsupported audio of type {type(audio).__name__}; pass a file path, "
                            f"a numpy array or a torch tensor")
    if audio.ndim == 2 and audio.shape[0] > audio.shape[1]:
        raise AudioclfError(f"a waveform of shape {audio.shape} looks like (time, channels); "
                            f"pass (channels, time) or (time,), e.g. wave.T")
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise AudioclfError(f"a waveform must be (time,) or (channels, time) with samples; got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise AudioclfError(f"a waveform of dtype {audio.dtype} is not float; scale it to [-1, 1] "
                            f"(e.g. int16 / 32768) and pass float32")
    if not np.isfinite(audio).all():
        raise AudioclfError("the waveform holds NaN or infinite samples")
    if sample_rate is not None and (not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0):
        raise AudioclfError(f"sample_rate={sample_rate!r} must be a positive integer (Hz)")
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    return resample(mono.astype(np.float32, copy=False), int(sample_rate or target_sr), target_sr)


def _check_readable(path) -> None:
    """Say so when this process may not read ``path`` (the decoder would call it undecodable). Tried with
    open() itself: ``os.access`` (audio._open's check) asks about the real user, not the effective one that
    a setuid or privilege-dropping server reads as."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise AudioclfError(f"{path}: permission denied (this user may not read the file)") from None
    except OSError:  # missing, a folder, ...: the decoder names the reason
        pass


def prepare(audio, sample_rate: Optional[int], features: FeatureConfig, window: int, hop: int) -> _Source:
    """Decode or convert one input and plan its windows (``window`` and ``hop`` in samples).

    A file longer than ``window`` (plus ``CROP_SLACK``) is not decoded here: its windows stream from disk.
    """
    sr = features.sample_rate
    if isinstance(audio, (str, os.PathLike)):
        _check_readable(audio)
        name, wave, duration_s = str(audio), None, audio_duration_s(audio)
    else:
        name, wave = "<array>", as_waveform(audio, sample_rate, sr)
        duration_s = wave.shape[0] / sr
    if duration_s * sr > window * (1 + CROP_SLACK):
        windows = _FileWindows(name, sr, window, hop) if wave is None else sliding_windows([wave], window, hop)
        return _Source(name, duration_s, windows)
    if wave is None:
        wave = load_audio(name, sr)
    return _Source(name, duration_s, [(0, fix_length(wave, window))])


class _PrepareFiles(torch.utils.data.Dataset):
    """``prepare`` in DataLoader workers; an unreadable file comes back as a source with its error."""

    def __init__(self, paths: Sequence, features: FeatureConfig, window: int, hop: int):
        self.paths, self.features, self.window, self.hop = [str(p) for p in paths], features, window, hop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i) -> _Source:
        path = self.paths[i]
        try:
            return prepare(path, None, self.features, self.window, self.hop)
        except AudioclfError as e:
            return _Source(path, 0.0, error=e)
        except Exception as e:  # one corrupt file must never end a long run
            return _Source(path, 0.0, error=AudioclfError(f"{path}: {type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------------------------- classifier

class Classifier:
    """A trained model ready for inference; build it with :func:`load`.

    Args:
        model (nn.Module): the trained network (:func:`audioclf.model.build_network`).
        config (RunConfig): its run config; ``config.features`` is the only source of feature settings.
        labels (list of str): class names, the order of probability columns.
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        batch_size (int, optional): windows per forward pass. (Default: ``32``)

    Inputs are file paths, or numpy arrays / torch tensors of shape ``(time,)`` or ``(channels, time)``
    in [-1, 1]; an array's ``sample_rate`` (Hz) defaults to the training sample rate.
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig, labels: Sequence[str], *, device="auto",
                 batch_size: int = 32):
        if batch_size < 1:
            raise AudioclfError(f"batch_size={batch_size} must be >= 1")
        self.labels = list(labels)
        self.config = config
        self.device = resolve_device(str(device))
        self.batch_size = batch_size
        # channels_last: oneDNN and cuDNN convolve it fastest (1.3x on a 2-core CPU, same fp32 arithmetic)
        self._net = WaveformClassifier(config.features, model).to(self.device, memory_format=torch.channels_last).eval()
        self.model = self._net.model

    def __repr__(self):
        f = self.config.features
        return (f"Classifier({len(self.labels)} classes, {f.sample_rate} Hz, {f.duration_s:g} s windows, "
                f"device={self.device})")

    # -- public API

    def predict_proba(self, audio, sample_rate: Optional[int] = None) -> np.ndarray:
        """Class probabilities, columns in ``labels`` order: ``(n_classes,)`` for one input, ``(n, n_classes)``
        for a list of inputs."""
        if not isinstance(audio, (list, tuple)):
            return np.asarray(self.classify(audio, sample_rate, top_k=1)["probs"], dtype=np.float32)
        window, hop = self._window(None, None)
        sources = (prepare(a, sample_rate, self.config.features, window, hop) for a in audio)
        rows = []
        for s in self._run(sources):
            if s.error is not None:
                raise s.error
            rows.append(np.mean(s.probs, axis=0))
        return np.stack(rows) if rows else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, audio, sample_rate: Optional[int] = None):
        """The most probable label (a list of them for a list of inputs), from ``predict_proba``."""
        best = self.predict_proba(audio, sample_rate).argmax(axis=-1)
        return self.labels[best] if best.ndim == 0 else [self.labels[i] for i in best]

    def classify(self, audio, sample_rate: Optional[int] = None, *, window_s: Optional[float] = None,
                 hop_s: Optional[float] = None, timeline: bool = False, top_k: int = 3) -> dict:
        """Classify one input (file path or waveform).

        Args:
            window_s (float, optional): sliding-window length in seconds. (Default: training duration)
            hop_s (float, optional): seconds between window starts. (Default: half the window)
            timeline (bool, optional): add ``windows``, each window's label. (Default: ``False``)
            top_k (int, optional): how many of the best classes to list. (Default: ``3``)

        Returns:
            dict: ``label``, ``confidence``, ``probs`` (list, ``labels`` order), ``top_k`` (list of
            ``{"label", "prob"}``), ``duration_s``, and with ``timeline`` ``windows`` (list of
            ``{"start_s", "end_s", "label", "confidence"}``).

        Raises:
            AudioclfError: naming the file, when it cannot be read.
        """
        *_, result = self.classify_steps(audio, sample_rate, window_s=window_s, hop_s=hop_s, timeline=timeline,
                                         top_k=top_k)
        return result

    def classify_steps(self, audio, sample_rate: Optional[int] = None, *, window_s: Optional[float] = None,
                       hop_s: Optional[float] = None, timeline: bool = False, top_k: int = 3,
                       batch_size: Optional[int] = None, max_duration_s: Optional[float] = None,
                       max_windows: Optional[int] = None) -> Iterator[Optional[dict]]:
        """:meth:`classify`, one forward pass at a time: yields ``None`` after each batch of windows, then
        the result. Between two steps a caller can let other work use the model (take a lock per step) or
        stop iterating (cancel); memory holds one batch.

        Args:
            batch_size (int, optional): windows per step. (Default: the Classifier's)
            max_duration_s (float, optional): refuse (LimitError) audio longer than this many seconds,
                counted as it decodes. (Default: no limit)
            max_windows (int, optional): refuse (LimitError) more windows than this. (Default: no limit)

        The other arguments, and the result, are :meth:`classify`'s.
        """
        window, hop = self._window(window_s, hop_s)
        self._check_top_k(top_k)
        source = prepare(audio, sample_rate, self.config.features, window, hop)
        if max_duration_s is not None or max_windows is not None:
            source.windows = _limited(source.windows, source.name, window, self.config.features.sample_rate,
                                      max_duration_s, max_windows)
        for done in self._run([source], batch_size=batch_size, steps=True):
            if done is None:
                yield None
        if source.error is not None:
            raise source.error
        yield self._summarise(source, window, timeline, top_k)

    def classify_files(self, paths: Sequence, *, window_s: Optional[float] = None, hop_s: Optional[float] = None,
                       timeline: bool = False, top_k: int = 3, num_workers: Optional[int] = None,
                       quiet: bool = False) -> Iterator[dict]:
        """:meth:`classify` for many files, decoded by background DataLoader workers while the model runs.

        Yields one dict per path, in order: ``classify``'s keys plus ``path`` and ``error`` (``None``, or
        the reason the file could not be read, in which case the other keys are absent). ``num_workers``
        defaults to ``runtime.auto_workers()`` (none for one or two files); a progress bar goes to stderr unless ``quiet``.
        """
        window, hop = self._window(window_s, hop_s)
        self._check_top_k(top_k)
        # a worker process costs more to start than a couple of files cost to decode
        workers = (auto_workers() if len(paths) > 2 else 0) if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(
            _PrepareFiles(paths, self.config.features, window, hop), batch_size=None, num_workers=workers,
            prefetch_factor=self.batch_size if workers else None)  # a batch of short clips stays queued
        sources = tqdm(self._run(loader), total=len(paths), desc="predict", unit="file", disable=True if quiet else None)
        # a generator expression, so that the checks above run now, not at the first result
        return ({"path": s.name, "error": str(s.error)} if s.error is not None else
                {"path": s.name, "error": None, **self._summarise(s, window, timeline, top_k)} for s in sources)

    def embed(self, audio, sample_rate: Optional[int] = None) -> np.ndarray:
        """Embeddings for search and clustering: the network's pooled trunk features (before any classifier
        layer; 512 for resnet18, 384 for mn04_as), averaged over a long input's windows.

        Returns ``(d,)`` for one input (path or waveform), ``(n, d)`` for a list of them.
        """
        one = not isinstance(audio, (list, tuple))
        window, hop = self._window(None, None)
        sources = (prepare(a, sample_rate, self.config.features, window, hop) for a in ([audio] if one else audio))
        rows = []
        for s in self._run(sources, self._embed):
            if s.error is not None:
                raise s.error
            rows.append(np.mean(s.probs, axis=0))
        return rows[0] if one else np.stack(rows)

    def embed_files(self, paths: Sequence, *, quiet: bool = False) -> np.ndarray:
        """:meth:`embed` of many files, decoded in background workers: ``(len(paths), d)``. A file that cannot
        be read gets a row of NaN and a warning naming it, so one bad file does not lose the others."""
        window, hop = self._window(None, None)
        workers = auto_workers() if len(paths) > 2 else 0
        loader = torch.utils.data.DataLoader(_PrepareFiles(paths, self.config.features, window, hop), batch_size=None,
                                             num_workers=workers, prefetch_factor=self.batch_size if workers else None)
        rows = []
        for s in tqdm(self._run(loader, self._embed), total=len(paths), desc="embed", unit="file",
                      disable=True if quiet else None):
            if s.error is not None:
                log.warning("%s", s.error)
            rows.append(np.mean(s.probs, axis=0) if s.error is None else None)
        dim = next((len(r) for r in rows if r is not None), 0)
        return np.stack([np.full(dim, np.nan, np.float32) if r is None else r for r in rows]) if rows else np.zeros((0, 0))

    # -- the one inference path

    def _embed(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self._net.logmel(wave))

    def _run(self, sources: Iterable[_Source], head=None, batch_size: Optional[int] = None,
             steps: bool = False) -> Iterator[Optional[_Source]]:
        """Push every window of every source through the model, ``batch_size`` windows per forward pass
        whatever source they come from; yield each source, in input order, once all its windows are done,
        and with ``steps`` also ``None`` after each forward pass.

        ``head`` maps a batch of windows to one row each (default: class probabilities); its rows are
        collected in each source's ``probs``."""
        batch_size = batch_size or self.batch_size
        pending: deque[_Source] = deque()
        batch: list[tuple[_Source, int, np.ndarray]] = []
        for source in sources:
            pending.append(source)
            windows = iter(source.windows)
            while source.error is None:
                try:
                    item = next(windows, None)
                except AudioclfError as e:
                    source.error = e
                    break
                except Exception as e:  # a streamed file that fails part-way fails alone
                    source.error = AudioclfError(f"{source.name}: decoding failed part-way ({type(e).__name__}: {e})")
                    break
                if item is None:
                    break
                batch.append((source, *item))
                if len(batch) == batch_size:
                    self._forward(batch, head)
                    if steps:
                        yield None
                    # the batch is empty now: every source but the current one has all its windows done
                    while len(pending) > 1:
                        yield pending.popleft()
            source.windows = ()  # done with it: free the clip
        self._forward(batch, head)
        while pending:
            yield pending.popleft()

    def _forward(self, batch: list, head=None) -> None:
        if not batch:
            return
        x = torch.from_numpy(np.stack([w for _, _, w in batch])).to(self.device)  # (batch, window samples)
        with torch.inference_mode():
            probs = (head or self._net)(x).float().cpu().numpy()  # (batch, n_classes or embedding size)
        for (source, start, _), p in zip(batch, probs):
            source.starts.append(start)
            source.probs.append(p)
        batch.clear()

    # -- helpers

    def _window(self, window_s: Optional[float], hop_s: Optional[float]) -> tuple[int, int]:
        """Window and hop in samples; defaults: the training duration and half of it."""
        f = self.config.features
        window_s = f.duration_s if window_s is None else window_s
        if not 0 < window_s <= 3600:
            raise AudioclfError(f"window_s={window_s!r} is out of range: it must be in (0, 3600] seconds")
        if hop_s is not None and not 0 < hop_s:
            raise AudioclfError(f"hop_s={hop_s!r} is out of range: it must be > 0 seconds")
        window = f.window_samples(window_s)
        # the default hop is the one the training cache used: the same windows in both
        return window, default_hop(window) if hop_s is None else max(1, int(round(hop_s * f.sample_rate)))

    def _check_top_k(self, top_k: int) -> None:
        if not isinstance(top_k, int) or top_k < 1:
            raise AudioclfError(f"top_k={top_k!r} must be an integer >= 1")

    def _summarise(self, source: _Source, window: int, timeline: bool, top_k: int) -> dict:
        sr = self.config.features.sample_rate
        probs = np.mean(source.probs, axis=0)
        best = np.argsort(-probs)[:top_k]
        out = {"label": self.labels[best[0]], "confidence": float(probs[best[0]]),
               "probs": [float(p) for p in probs],
               "top_k": [{"label": self.labels[i], "prob": float(probs[i])} for i in best],
               "duration_s": source.duration_s}
        if timeline:
            out["windows"] = [{"start_s": start / sr, "end_s": min((start + window) / sr, source.duration_s),
                               "label": self.labels[int(p.argmax())], "confidence": float(p.max())}
                              for start, p in zip(source.starts, source.probs)]
        return out


def write_embeddings(out, paths: Sequence[str], emb: np.ndarray) -> Path:
    """``.npy``: the array, plus ``<stem>.paths.txt`` with one path per row; ``.parquet``: a ``path`` column
    and one ``embedding`` list column (needs pandas with pyarrow)."""
    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise AudioclfError(f"--out {out}: write embeddings to a .npy or .parquet file")
    if not out.parent.is_dir():
        raise AudioclfError(f"--out {out}: folder {out.parent} does not exist")
    if out.suffix == ".parquet":
        try:
            import pandas as pd

            with atomic_path(out) as tmp:
                pd.DataFrame({"path": list(paths), "embedding": list(emb)}).to_parquet(tmp)
        except ImportError:
            raise AudioclfError("writing .parquet needs pandas and pyarrow (pip install pandas pyarrow); "
                                "or write .npy") from None
        return out
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, emb.astype(np.float32))
    with atomic_path(out.with_suffix(".paths.txt")) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in paths))
    return out


def load(model, device: str = "auto", *, batch_size: int = 32) -> Classifier:
    """A :class:`Classifier` from a run directory, ``.pt`` checkpoint or exported safetensors folder."""
    net, config, labels = load_model(model)
    return Classifier(net, config, labels, device=device, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- CLI

# "http://...", "s3://...": a scheme, then "//"
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STDIN = ("-", "/dev/stdin")


def _refuse_url(arg: str, where: str = "") -> None:
    if URL.match(arg):
        raise AudioclfError(f"{arg}{where}: URLs are not supported; download the file and pass its path")


def collect_paths(paths: Sequence) -> list[Path]:
    """Expand PATH arguments: a folder gives its audio files (recursive, sorted), a ``.txt`` file the paths
    it lists (one a line, relative to the list's folder; blank lines and ``#`` comments skipped), anything
    else is taken as an audio file (a missing one is reported when it is read). URLs are refused."""
    out = []
    for arg in paths:
        _refuse_url(str(arg))  # before Path(), which would fold "//" into "/"
        p = Path(arg)
        listed = [p]
        if p.suffix.lower() == ".txt" and not p.is_dir():
            try:
                lines = p.read_text(encoding="utf-8-sig").splitlines()
            except OSError as e:
                raise AudioclfError(f"{p}: cannot read the list of paths ({e.strerror})") from None
            listed = []
            for i, line in enumerate(map(str.strip, lines), 1):
                if line and not line.startswith("#"):
                    _refuse_url(line, f" (line {i} of {p})")
                    listed.append(p.parent / line)
        for q in listed:
            if not q.is_dir():
                out.append(q)
                continue
            found = find_audio_files(q)
            if not found:
                log.warning("%s: folder holds no audio files (%s)", q, ", ".join(AUDIO_EXTENSIONS))
            out += found
    if not out:
        raise AudioclfError(f"no audio files to classify in {', '.join(map(str, paths))}")
    return out


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any model work."""
    if out.is_dir():
        raise AudioclfError(f"--out {out} is a folder; name a .csv or .json file")
    folder = out.parent
    if not folder.is_dir():
        raise AudioclfError(f"--out {out}: the folder {folder} does not exist"
                            + (" (it is a file)" if folder.exists() else ""))
    if not os.access(folder, os.W_OK):
        raise AudioclfError(f"--out {out}: the folder {folder} is not writable")


def _check_not_an_input(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``--out`` that is one of the inputs: writing it would destroy that input."""
    target = out.resolve()
    for p in inputs:
        if p.resolve() == target or (out.exists() and p.exists() and os.path.samefile(p, out)):
            raise AudioclfError(f"--out {out} is also an input ({p}): writing it would destroy that input; "
                                f"choose another file")


def _read_stdin(folder: Path) -> Path:
    """``predict -``: the audio piped in, saved to a file in ``folder`` (the decoders need to seek)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise AudioclfError("'-' reads audio from stdin, but stdin is a terminal: pipe a file in "
                            "(audioclf predict MODEL - < clip.wav)")
    path = folder / "stdin"
    path.write_bytes(sys.stdin.buffer.read())
    return path


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (surrogate-escaped by Python)
    become ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _write_csv(f, results: Iterable[dict], timeline: bool) -> None:
    fields = ["path", "label", "confidence", "top_k", "error"] + (["start_s", "end_s"] if timeline else [])
    w = csv.DictWriter(f, fields, restval="", lineterminator="\n")
    w.writeheader()
    for r in results:
        if r["error"]:
            w.writerow({"path": r["path"], "error": r["error"]})
            continue
        w.writerow({"path": r["path"], "label": r["label"], "confidence": f"{r['confidence']:.4f}",
                    "top_k": ";".join(f"{t['label']}:{t['prob']:.4f}" for t in r["top_k"])})
        for win in r.get("windows", ()):
            w.writerow({"path": r["path"], "label": win["label"], "confidence": f"{win['confidence']:.4f}",
                        "start_s": f"{win['start_s']:.3f}", "end_s": f"{win['end_s']:.3f}"})


def _write_submission(f, results: Iterable[dict]) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["ID", "Class"])
    for r in results:  # a failed file keeps its row, with no class, so the IDs stay complete
        w.writerow([Path(r["path"]).name, r.get("label", "")])


def _write_json(f, results: Iterable[dict], labels: list[str]) -> None:
    items = []
    for r in results:
        item = {"path": r["path"], "label": r.get("label"), "confidence": r.get("confidence"),
                "probs": dict(zip(labels, r["probs"])) if "probs" in r else None,
                "top_k": r.get("top_k"), "duration_s": r.get("duration_s"), "error": r["error"]}
        if "windows" in r:
            item["windows"] = r["windows"]
        items.append(item)
    json.dump(items, f, indent=2)
    f.write("\n")


def predict_cli(args) -> int:
    """``audioclf predict``: classify every PATH and write CSV (default, to stdout without ``--out``),
    JSON (``--out NAME.json``) or an ``ID,Class`` submission. ``-`` reads one file from stdin. Returns the
    exit code: 1 when every file failed, else 0 (failures are rows with an ``error``)."""
    out = Path(args.out) if args.out else None
    kind = out.suffix.lower() if out else ".csv"
    if kind not in (".csv", ".json"):
        raise AudioclfError(f"Unsupported --out {out}: name a .csv or .json file")
    if args.submission and kind == ".json":
        raise AudioclfError("--submission writes CSV: give --out NAME.csv, or no --out for stdout")
    if out:
        _check_out(out)
    if sum(a in STDIN for a in args.paths) > 1:
        raise AudioclfError("stdin ('-' or /dev/stdin) can be read once: name it once")
    with tempfile.TemporaryDirectory(prefix="audioclf-stdin-") as tmp:
        given = [str(_read_stdin(Path(tmp))) if a in STDIN else a for a in args.paths]
        shown = {g: a for g, a in zip(given, args.paths) if a in STDIN}  # the temp file is "-" in the output
        paths = collect_paths(given)
        if out:
            _check_not_an_input(out, [*map(Path, args.paths), *paths])
        return _predict_files(args, paths, out, kind, shown)


def _predict_files(args, paths: list[Path], out: Optional[Path], kind: str, shown: dict) -> int:
    clf = load(args.model, args.device, batch_size=args.batch_size)
    failed, escaped = [], 0

    def logged(results):
        nonlocal escaped
        for r in results:
            raw = r["path"]
            name = shown.get(raw, raw)
            r["path"] = _printable(name)
            escaped += r["path"] != name
            if r["error"]:
                r["error"] = _printable(r["error"].replace(raw, name))
                log.warning("%s", r["error"])
                failed.append(r["path"])
            yield r

    results = logged(clf.classify_files(paths, window_s=args.window, hop_s=args.hop, timeline=args.timeline,
                                        top_k=args.top_k, quiet=args.quiet))
    with atomic_path(out) if out else nullcontext() as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") if out else nullcontext(sys.stdout) as f:
            if args.submission:
                _write_submission(f, results)
            elif kind == ".json":
                _write_json(f, results, clf.labels)
            else:
                _write_csv(f, results, args.timeline)
    if escaped:
        log.warning("%d file name(s) are not valid UTF-8: written with \\xNN escapes for the bytes that are not", escaped)
    log.info("%d file(s) classified, %d failed%s", len(paths) - len(failed), len(failed),
             f"; wrote {out}" if out else "")
    return 1 if len(failed) == len(paths) else 0
