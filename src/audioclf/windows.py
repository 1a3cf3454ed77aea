"""Inputs made ready for the model (:mod:`audioclf.predict`): a file path or a waveform decoded or converted,
then cut into the windows the model classifies, at ``audio.window_starts``. A file of more than one window
streams its windows block by block, so memory stays bounded whatever its length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .audio import audio_duration_s, fix_length, load_audio, settled_windows, stream_audio, window_starts
from .config import FeatureConfig
from .errors import AudioclfError
from .waveforms import as_waveform


class LimitError(AudioclfError):
    """An input passed a limit its caller set (``max_duration_s``, ``max_windows``): the server answers 413."""


def sliding_windows(blocks: Iterable[np.ndarray], window: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """Cut consecutive 1-D blocks of one recording into windows, assembled across block boundaries.

    Args:
        blocks (iterable of np.ndarray): consecutive pieces of the recording, any lengths.
        window (int): samples per window.
        hop (int): samples between window starts.

    Yields ``(start sample, window)`` at ``audio.window_starts`` of the whole recording, each window as
    soon as the audio decoded so far settles it. Memory holds one block plus one window.
    """
    buf, buf_start, done = np.zeros(0, np.float32), 0, 0
    for block in blocks:
        buf = np.concatenate([buf, block])
        end = buf_start + len(buf)
        # every start but the last is settled: the last may be a centred or end-aligned window that
        # more audio would move
        settled = settled_windows(end, window, hop)
        for start in range(done * hop, settled * hop, hop):
            yield start, buf[start - buf_start:start - buf_start + window]
        done = settled
        # keep what the next window on the hop grid, or a final end-aligned one, can still need
        keep_from = max(buf_start, min(done * hop, end - window))
        buf, buf_start = buf[keep_from - buf_start:], keep_from
    for start in window_starts(buf_start + len(buf), window, hop)[done:]:
        yield start, fix_length(buf[start - buf_start:start - buf_start + window], window)


def count_windows(n_samples: int, window: int, hop: int) -> int:
    """How many windows :func:`prepare` gives a recording of ``n_samples`` samples, without decoding it."""
    return settled_windows(n_samples, window, hop) + 1


def limited(windows: Iterable[tuple[int, np.ndarray]], name: str, window: int, sample_rate: int,
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


class FileWindows:
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
class Source:
    """One input made ready for the model: its windows (a list, or a lazy stream) or why it failed."""

    name: str  # file path, or "<array>"
    duration_s: float
    windows: Iterable[tuple[int, np.ndarray]] = ()  # (start sample, window of `window` samples)
    error: Optional[Exception] = None
    starts: list[int] = field(default_factory=list)  # filled in as the windows pass through the model
    rows: list[np.ndarray] = field(default_factory=list)  # the model head's output for each window
    scores: list[float] = field(default_factory=list)  # each window's known-class score, where a rule asks for it

    def mean(self) -> np.ndarray:
        """The rows averaged over the windows: what a long input gets as a whole."""
        return np.mean(self.rows, axis=0)


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


def prepare(audio, sample_rate: Optional[int], features: FeatureConfig, window: int, hop: int) -> Source:
    """Decode or convert one input and plan its windows (``window`` and ``hop`` in samples).

    A file of more than one window is not decoded here: its windows stream from disk.
    """
    sr = features.sample_rate
    if isinstance(audio, (str, os.PathLike)):
        _check_readable(audio)
        name, wave, duration_s = str(audio), None, audio_duration_s(audio)
        n_samples = round(duration_s * sr)  # from the header, before decoding
    else:
        name, wave = "<array>", as_waveform(audio, sample_rate, sr)
        n_samples = wave.shape[0]
        duration_s = n_samples / sr
    if count_windows(n_samples, window, hop) > 1:
        windows = FileWindows(name, sr, window, hop) if wave is None else sliding_windows([wave], window, hop)
        return Source(name, duration_s, windows)
    if wave is None:
        wave = load_audio(name, sr)
    return Source(name, duration_s, [(0, fix_length(wave, window))])


class PrepareFiles(torch.utils.data.Dataset):
    """``prepare`` in DataLoader workers; an unreadable file comes back as a source with its error."""

    def __init__(self, paths: Sequence, features: FeatureConfig, window: int, hop: int):
        self.paths, self.features, self.window, self.hop = [str(p) for p in paths], features, window, hop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i) -> Source:
        path = self.paths[i]
        try:
            return prepare(path, None, self.features, self.window, self.hop)
        except AudioclfError as e:
            return Source(path, 0.0, error=e)
        except Exception as e:  # one corrupt file must never end a long run
            return Source(path, 0.0, error=AudioclfError(f"{path}: {type(e).__name__}: {e}"))
