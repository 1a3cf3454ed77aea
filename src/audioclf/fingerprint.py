"""Aligned log-mel fingerprints: do two clips hold the same recording, whatever was done to one of them?

A pretrained network's embedding says what a clip sounds like, so two recordings of rain, or of two
roosters, can be closer than a clip and its own resampled copy (docs/audit.md). The audit therefore takes
the pairs whose embeddings are close as candidates only, and confirms each here: the two clips' log-mels
below 7.6 kHz (so a copy resampled to 16 kHz still matches), of the clip scaled to a peak of 1, each band
minus its mean over the clip (so a gain change or a fixed filter changes nothing) and each frame minus its
mean over the bands (so that the loudness envelope, which any two clips of events share, does not count), are correlated at every time offset where they overlap by
at least half the shorter clip (so a trimmed copy matches at its offset). A copy keeps the fine
fluctuations of the original, frame for frame; another recording of the same kind of sound does not.
Frames of digital silence (padding), and frames more than :data:`AUDIBLE_DB` below the clip's loudest, are left
out, so two clips padded or fading alike do not match by their quiet parts.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .audio import load_audio
from .config import FeatureConfig
from .features import LogMel

FINGERPRINT = FeatureConfig(sample_rate=16000, n_mels=64, n_fft=512, hop_length=160, win_length=400, f_min=50.0,
                            f_max=7600.0, peak_normalize=True, compression="log")
SILENT = -9.0  # a frame whose loudest band stays below this log-mel value is digital silence (floor -11.5)
# what lies more than 40 dB below the clip's loudest band is set to that level: lossy codecs drop it (the
# match of an Ogg Vorbis copy went from 0.92 to 0.96 on a test clip, another clip's stayed at 0.18)
RANGE_DB = 40.0
# shortest overlap that counts: half the shorter clip. ESC-50's thunderstorms matched each other over the last
# second of one and the first of another (their quiet tails), never over half a clip
MIN_OVERLAP = 0.5
# a frame counts when its loudest band is within this of the clip's loudest: quieter ones hold little but the
# floor, and the floor's frames, once the bands' means are gone, are only the clip's mean spectrum upside down
AUDIBLE_DB = 30.0


@functools.cache
def _logmel() -> LogMel:
    return LogMel(FINGERPRINT)


def fingerprint(path) -> np.ndarray:
    """``(n_mels, frames)`` float32: the log-mel of ``path`` at 16 kHz within :data:`RANGE_DB` of its loudest
    band, each band minus its mean over the audible frames, then each frame minus its mean over the bands;
    silent frames, and the frames the STFT pads at either end, are 0.

    Without the frames' means, the loudness envelope, which every band shares, would dominate: two clips of
    sparse events would match wherever their events line up (0.52 for two test clips, 0.18 without it).
    """
    with torch.inference_mode():
        x = _logmel()(torch.from_numpy(load_audio(path, FINGERPRINT.sample_rate))).numpy()
    loudest = x.max(axis=0)  # (frames,)
    audible = (loudest > SILENT) & (loudest > loudest.max() - AUDIBLE_DB / 10 * np.log(10))
    # the frames the STFT pads with zeros: every clip has them, at its ends, and in a steady clip they would be
    # all that is left once the bands' means are gone
    edge = -(-FINGERPRINT.n_fft // 2 // FINGERPRINT.hop_length)
    audible[:edge] = audible[len(audible) - edge:] = False
    if not audible.any():
        return np.zeros_like(x)
    x = np.maximum(x, x.max() - RANGE_DB / 10 * np.log(10))  # log of power: 10 dB is a factor of 10
    x = x - x[:, audible].mean(axis=1, keepdims=True)
    x = x - x.mean(axis=0, keepdims=True)
    x[:, ~audible] = 0
    return x


def aligned_match(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(correlation, offset_s)``: the highest normalised correlation of fingerprints ``a`` and ``b`` over the
    time offsets where they overlap enough, and that offset (the time in ``a`` where ``b`` starts, in s;
    negative when ``b`` starts before ``a``). ``(0.0, 0.0)`` when no offset overlaps enough."""
    from scipy.signal import fftconvolve

    ta, tb = a.shape[1], b.shape[1]
    # num[k] = sum over bands and frames of a[:, t] * b[:, t - lag], lag = k - (tb - 1)
    num = fftconvolve(a, b[:, ::-1], mode="full", axes=1).sum(axis=0)
    lags = np.arange(-(tb - 1), ta)
    ca = np.concatenate([[0.0], np.cumsum((a.astype(np.float64) ** 2).sum(axis=0))])
    cb = np.concatenate([[0.0], np.cumsum((b.astype(np.float64) ** 2).sum(axis=0))])
    a0, a1 = np.maximum(lags, 0), np.minimum(ta, tb + lags)  # the overlap in a's frames
    b0, b1 = a0 - lags, a1 - lags  # and in b's
    energy = (ca[a1] - ca[a0]) * (cb[b1] - cb[b0])
    frames_per_s = FINGERPRINT.sample_rate / FINGERPRINT.hop_length
    enough = (a1 - a0) >= MIN_OVERLAP * min(ta, tb)
    valid = enough & (energy > 0)
    if not valid.any():
        return 0.0, 0.0
    corr = np.where(valid, num / np.sqrt(np.where(valid, energy, 1.0)), -np.inf)
    best = int(corr.argmax())
    return float(corr[best]), float(lags[best] / frames_per_s)
