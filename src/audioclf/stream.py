"""Live detection: PCM samples as they arrive, through the model a window at a time, into the same
per-class tracks and events as :mod:`audioclf.events` makes of a file.

Every hop (``hop_s`` of audio, 0.25-0.5 s), the newest window of audio (a ring buffer of one window) goes
through the model once; until the ring is full, the audio received so far, not padded: a file's first window
holds the audio that follows, and zeros in its place are a sound cut off, which a tagger misreads. Its
points newer than the last hop fill the track's cells (``DetectConfig.hop_s``) up to the newest point; cells
then pass through the post-processing of :func:`audioclf.events.find_events` in its incremental form: the
median filter once it has the cells it needs on both sides, then hysteresis, merging and the minimum
duration (:class:`EventTracker`). An event is reported open as soon as it is sure to be reported (it reached
the onset threshold and lasts ``min_duration_s``), and closed once no later run can merge with it
(``merge_gap_s`` past its end).

A file's tracks take each time from the window whose centre is nearest; a stream cannot wait half a window
for that one, so it reads each time from the newest window, where the time sits near the window's end.
The events match within a hop for a network whose frames see local context (tests/test_stream.py); the
measured difference for mn04_as is in docs/listen.md.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional, Sequence

import numpy as np

from .audio import resample_stream
from .errors import AudioclfError
from .events import DetectConfig, interp_rows, median_cells, smooth, step_times
from .options import ServeLimits

# the PCM encodings a client may send, little-endian, and the numpy types that read them
DTYPES = {"float32": "<f4", "int16": "<i2"}
INT16_SCALE = 1 / 32768.0
TOP_K = 5  # classes in each message: the page's live list


class EventTracker:
    """Hysteresis, merging and the minimum duration of :func:`~audioclf.events.find_events`, one cell of a
    smoothed track at a time: :meth:`push` takes cells ``(n, n_classes)`` and returns what changed, events
    opened and closed; :meth:`finish` closes what is open at the end of the recording. The events closed
    over a whole track are those ``find_events(..., smoothed=True)`` gives.

    Per class the state is a few numbers, whatever the length of the stream: the current run above the
    offset threshold, and the pending event (kept runs merged so far).
    """

    def __init__(self, labels: Sequence[str], config: DetectConfig, ignore: Sequence[str] = ()):
        n = len(labels)
        self.labels, self.config = list(labels), config
        self.gap = int(round(config.merge_gap_s / config.hop_s))
        self.active = np.array([label not in ignore for label in labels])
        self.run_start = np.full(n, -1)  # first cell of the current run above the offset threshold
        self.run_max = np.zeros(n)
        self.in_event = np.zeros(n, bool)  # the current run reached the onset threshold: it is the event's
        self.ev_start, self.ev_end = np.full(n, -1), np.full(n, -1)  # the pending event's cells [start, end)
        self.ev_max = np.zeros(n)
        self.ev_open = np.zeros(n, bool)  # reported open
        self.cells = 0

    def push(self, cells: np.ndarray) -> list[dict]:
        out = []
        for p in np.atleast_2d(cells):
            out += self._cell(p)
        return out

    def finish(self, duration_s: float) -> list[dict]:
        """Close every pending event at the end of a recording of ``duration_s``."""
        self.run_start[:] = -1
        self.in_event[:] = False
        return [e for c in np.flatnonzero(self.ev_start >= 0) for e in self._close(c, duration_s)]

    def _cell(self, p: np.ndarray) -> list[dict]:
        cfg, i = self.config, self.cells
        above = (p >= cfg.offset_threshold) & self.active
        starts = above & (self.run_start < 0)
        self.run_start[starts], self.run_max[starts] = i, p[starts]
        self.run_max[above] = np.maximum(self.run_max[above], p[above])
        ended = ~above & (self.run_start >= 0)
        self.run_start[ended], self.in_event[ended] = -1, False
        # a run reaching the onset threshold joins the pending event, which is near enough to merge: one
        # that is not was closed when the run started
        joins = above & ~self.in_event & (self.run_max >= cfg.onset_threshold)
        self.ev_start[joins & (self.ev_start < 0)] = self.run_start[joins & (self.ev_start < 0)]
        self.in_event |= joins
        self.ev_end[self.in_event] = i + 1
        self.ev_max[self.in_event] = np.maximum(self.ev_max[self.in_event], self.run_max[self.in_event])
        self.cells = i + 1
        out = []
        # no later run can merge: the earliest one to come starts at the current run or the next cell
        earliest = np.where(self.run_start >= 0, self.run_start, i + 1)
        for c in np.flatnonzero((self.ev_start >= 0) & ~self.in_event & (earliest - self.ev_end > self.gap)):
            out += self._close(c, np.inf)
        long_enough = (self.ev_end - self.ev_start) * cfg.hop_s >= cfg.min_duration_s - 1e-9
        for c in np.flatnonzero((self.ev_start >= 0) & ~self.ev_open & long_enough):
            self.ev_open[c] = True
            out.append(self._event(c, "open", None))
        return out

    def _event(self, c: int, state: str, offset: Optional[float]) -> dict:
        return {"state": state, "label": self.labels[c], "onset": round(float(self.ev_start[c] * self.config.hop_s), 3),
                "offset": None if offset is None else round(offset, 3), "score": round(float(self.ev_max[c]), 4)}

    def _close(self, c: int, duration_s: float) -> list[dict]:
        onset, offset = float(self.ev_start[c] * self.config.hop_s), float(min(self.ev_end[c] * self.config.hop_s,
                                                                               duration_s))
        out = []
        if offset - onset >= self.config.min_duration_s - 1e-9:
            if not self.ev_open[c]:  # reached its length only now (at the end of the recording)
                out.append(self._event(c, "open", None))
            out.append(self._event(c, "close", offset))
        self.ev_start[c], self.ev_end[c], self.ev_max[c], self.ev_open[c] = -1, -1, 0.0, False
        return out


class MedianStream:
    """:func:`~audioclf.events.smooth` of a track given a few cells at a time: each cell comes out once the
    filter has its neighbours on both sides (``median_s / 2`` later); the first and last cells are padded
    as the file's filter pads them (``nearest``)."""

    def __init__(self, config: DetectConfig):
        self.config, self.half = config, median_cells(config) // 2
        self.cells: deque = deque()  # the last 2 * half raw cells before the next one out, and what follows

    def push(self, cells: np.ndarray, last: bool = False) -> np.ndarray:
        if len(cells) and not self.cells:
            self.cells.extend([cells[0]] * self.half)
        self.cells.extend(cells)
        if last and self.cells:
            self.cells.extend([self.cells[-1]] * self.half)
        if len(self.cells) <= 2 * self.half:
            return np.zeros((0, len(cells[0]) if len(cells) else 0), np.float32)
        block = np.stack(self.cells)
        out = smooth(block, self.config)[self.half:len(block) - self.half]
        for _ in range(len(out)):
            self.cells.popleft()
        return out


class StreamingDetector:
    """One live stream through ``clf``: PCM samples in (:meth:`feed`), a message per hop out (:meth:`steps`).

    Args:
        clf (Classifier): the model; its features' sample rate and window are the stream's.
        config (DetectConfig): the post-processing (the settings saved with the model).
        sample_rate (int): the samples' rate, in Hz; resampled to the model's as they arrive.
        hop_s (float, optional): seconds of audio between messages (and forward passes). (Default: ``0.5``)
        top_k (int, optional): classes in each message, most probable first. (Default: ``5``)
        ignore (list of str, optional): classes never reported as events. (Default: none)

    Each message: ``{"type": "hop", "time_s", "top": [{"label", "prob"}], "events": [{"state": "open" |
    "close", "label", "onset", "offset", "score"}]}``; times in seconds from the stream's start.
    """

    def __init__(self, clf, config: DetectConfig, *, sample_rate: int, hop_s: float = ServeLimits.listen_hop_s,
                 top_k: int = TOP_K, ignore: Sequence[str] = ()):
        features = clf.config.features
        self.clf, self.config, self.top_k = clf, config, min(top_k, len(clf.labels))
        self.sr, self.frames = features.sample_rate, config.source == "frames"
        self.window_s = features.duration_s if self.frames else config.window_s
        self.window = round(self.window_s * self.sr)
        self.frame_hop_s = features.hop_length / self.sr if self.frames else None
        self.hop = features.window_samples(hop_s, "hop_s")  # the first hop is the first input the network hears
        self.resampler = None
        if sample_rate != self.sr:
            self.resampler = resample_stream(sample_rate, self.sr)
        self.ring = np.zeros(0, np.float32)  # the last window of samples
        self.pending = np.zeros(0, np.float32)  # samples fed, not yet through the model
        self.total = 0  # samples through the model
        self.cells = 0  # track cells made
        self.last_point: Optional[tuple] = None  # (time, row) of a windows source: interpolated towards
        self.median = MedianStream(config)
        self.tracker = EventTracker(clf.labels, config, ignore)

    @property
    def time_s(self) -> float:
        """Seconds of audio through the model."""
        return self.total / self.sr

    def feed(self, samples: np.ndarray) -> None:
        """Queue mono samples (float, at the stream's rate) for :meth:`steps`."""
        samples = np.asarray(samples, np.float32)
        if not np.isfinite(samples).all():
            raise AudioclfError("the stream holds NaN or infinite samples")
        if self.resampler is not None:
            samples = self.resampler.resample_chunk(samples)
        self.pending = np.concatenate([self.pending, samples])

    def steps(self, last: bool = False) -> Iterator[dict]:
        """A message for each hop of queued audio, one forward pass per ``next``; with ``last`` the rest too,
        as at the end of a file: the resampler's tail, a last partial hop, and every open event closed."""
        if last and self.resampler is not None:
            self.pending = np.concatenate([self.pending, self.resampler.resample_chunk(np.zeros(0, np.float32),
                                                                                       last=True)])
        final = False
        while len(self.pending) >= self.hop - self.total % self.hop or (last and len(self.pending)):
            n = min(len(self.pending), self.hop - self.total % self.hop)
            self.ring = np.concatenate([self.ring, self.pending[:n]])[-self.window:]
            self.pending, self.total = self.pending[n:], self.total + n
            final = last and not len(self.pending)
            yield self._hop(self._cells(final), final)
        if last and not final:  # nothing was left after the last hop: its end closes what is open
            yield self._hop(self._cells(True), True)

    def _cells(self, last: bool) -> np.ndarray:
        """The model on the newest window, or on the audio so far while the ring is not yet full: the
        track's cells up to its newest point (with ``last``, up to the end of the recording, the last point
        held as a file's track holds it)."""
        now = self.time_s
        # A file's first window holds the audio that follows; zeros in its place are a sound cut off dead,
        # which mn04_as answers with dozens of classes that are not there. So the network hears only what has
        # arrived, as it hears a file's newest audio at the file's end; only a recording that ends shorter
        # than a window is padded at the end, as a file that short is.
        wave, start_s = self.ring, max(0.0, now - self.window_s)
        if last and len(wave) < self.window:
            wave = np.concatenate([wave, np.zeros(self.window - len(wave), np.float32)])
        window_s = len(wave) / self.sr
        *_, source = self.clf.window_steps(wave, self.sr, window_s=window_s, hop_s=window_s, frames=self.frames)
        rows = np.atleast_2d(source.rows[0])  # a window's row at its centre, frame-level rows over it
        t = start_s + step_times(len(rows), window_s, self.frame_hop_s)
        keep = t <= now + 1e-9
        # a padded window's first point can lie past the recording's end: the track holds it from the start
        t, rows = (t[keep], rows[keep]) if keep.any() else (t[:1], rows[:1])
        if not self.frames and self.last_point is not None:
            t, rows = np.concatenate([[self.last_point[0]], t]), np.concatenate([self.last_point[1][None], rows])
        self.last_point = (t[-1], rows[-1])
        newest = np.ceil(now / self.config.hop_s - 1e-9) if last else np.floor(t[-1] / self.config.hop_s - 0.5 + 1e-9) + 1
        grid = (np.arange(self.cells, max(self.cells, int(newest))) + 0.5) * self.config.hop_s
        self.cells += len(grid)
        return interp_rows(t, rows, grid).astype(np.float32) if len(grid) else np.zeros((0, rows.shape[1]), np.float32)

    def _hop(self, cells: np.ndarray, last: bool) -> dict:
        events = self.tracker.push(self.median.push(cells, last))
        if last:
            events += self.tracker.finish(self.time_s)
        probs = cells.mean(axis=0) if len(cells) else np.zeros(len(self.clf.labels))
        top = np.argsort(-probs, kind="stable")[:self.top_k]
        return {"type": "hop", "time_s": round(self.time_s, 3), "events": events,
                "top": [{"label": self.clf.labels[c], "prob": round(float(probs[c]), 4)} for c in top]}


def pcm_samples(data: bytes, dtype: str) -> np.ndarray:
    """Little-endian PCM bytes as float32 samples in [-1, 1]."""
    if len(data) % np.dtype(DTYPES[dtype]).itemsize:
        raise AudioclfError(f"a chunk of {len(data)} bytes is not a whole number of {dtype} samples")
    samples = np.frombuffer(data, DTYPES[dtype])
    return samples * np.float32(INT16_SCALE) if dtype == "int16" else samples.astype(np.float32)
