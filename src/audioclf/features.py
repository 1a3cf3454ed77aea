"""Feature extraction as small ``nn.Module``s over batched waveforms: Spectrogram -> MelScale -> log1p.

Fixed tensors (window, filterbank, statistics) are buffers, so ``.to(device)`` moves them and the
whole front end runs on the GPU in batch. The modules take their settings as arguments without
defaults, or as a :class:`~audioclf.config.FeatureConfig`: the defaults live in the config only.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from .config import FeatureConfig
from .errors import AudioclfError

LOG_FLOOR = 1e-5  # compression="log": log(mel + LOG_FLOOR), so silence stays finite (EfficientAT's floor)


class Spectrogram(nn.Module):
    """Power spectrogram of a centred, zero-padded STFT with a Hann window.

    Args:
        n_fft (int): Size of FFT in samples, creates ``n_fft // 2 + 1`` frequency bins.
        hop_length (int): Samples between the starts of successive frames.
        win_length (int): Window size in samples, ``<= n_fft``; a shorter window is centred in the FFT
            frame.
        periodic (bool): Periodic Hann window (librosa's, for spectral analysis) or symmetric
            (``periodic=False``, the one EfficientAT's models were trained with).

    Shape:
        - Input: ``(..., time)`` waveform, in samples.
        - Output: ``(..., n_fft // 2 + 1, 1 + time // hop_length)`` power (squared magnitude).
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int, periodic: bool):
        super().__init__()
        if not 0 < win_length <= n_fft:
            raise AudioclfError(f"win_length={win_length} must be in (0, n_fft={n_fft}]")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.register_buffer("window", torch.hann_window(win_length, periodic=periodic), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., time) -> (..., n_fft // 2 + 1, 1 + time // hop_length), power (magnitude squared)."""
        shape = wave.shape
        # librosa >= 0.10 pads with zeros ("constant"), not reflection; we match it.
        spec = torch.stft(wave.reshape(-1, shape[-1]).float(), self.n_fft, self.hop_length, self.win_length,
                          self.window, center=True, pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()
        return power.reshape(shape[:-1] + power.shape[-2:])


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: Optional[float]) -> np.ndarray:
    """Slaney-normalised triangular mel filters, (n_mels, n_fft // 2 + 1) float32. ``sample_rate``, ``f_min``
    and ``f_max`` are in Hz; ``f_max=None`` is ``sample_rate / 2``.

    The same numbers as ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min,
    fmax=f_max)`` (tested against it), without importing librosa: that import alone costs seconds of a
    prediction's cold start and about 200 MB.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    ramps = mel_f[:, None] - fft_freqs[None, :]
    fdiff = np.diff(mel_f)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    if not np.all((mel_f[:-2] == 0) | (weights.max(axis=1) > 0)):
        warnings.warn(f"Empty mel filters with n_mels={n_mels}, n_fft={n_fft}, sample_rate={sample_rate}: "
                      f"try a larger n_fft or fewer n_mels", stacklevel=2)
    return weights.astype(np.float32)


def kaldi_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float,
                         f_max: Optional[float]) -> np.ndarray:
    """Kaldi's triangular mel filters, (n_mels, n_fft // 2 + 1) float32: the front end of EfficientAT's
    AudioSet models (``torchaudio.compliance.kaldi.get_mel_banks`` padded with a zero Nyquist column).

    Kaldi's mel scale is ``1127 ln(1 + f / 700)``; the triangles are equally spaced on it between ``f_min``
    and ``f_max`` and reach 1 at their centres (no area normalisation, unlike Slaney's). The Nyquist bin
    gets no weight.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    edges = mel(f_min) + np.arange(n_mels + 2)[:, None] * (mel(f_max) - mel(f_min)) / (n_mels + 1)
    bins = mel(np.arange(n_fft // 2) * sample_rate / n_fft)[None, :]
    up = (bins - edges[:-2]) / (edges[1:-1] - edges[:-2])
    down = (edges[2:] - bins) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(up, down))
    return np.pad(weights, ((0, 0), (0, 1))).astype(np.float32)


class MelScale(nn.Module):
    """Project a power spectrogram onto a triangular mel filterbank.

    Args:
        n_mels (int): Number of mel bands.
        sample_rate (int): Sample rate in Hz.
        n_fft (int): FFT size in samples the spectrogram was computed with.
        f_min (float): Lowest filter edge in Hz.
        f_max (float or None): Highest filter edge in Hz; ``None`` = ``sample_rate / 2``.
        scale (str): ``"slaney"`` (``librosa.filters.mel``: Slaney's scale, area-normalised) or ``"kaldi"``
            (:func:`kaldi_mel_filterbank`).

    Shape:
        - Input: ``(..., n_fft // 2 + 1, frames)`` power spectrogram.
        - Output: ``(..., n_mels, frames)`` mel power.
    """

    def __init__(self, n_mels: int, sample_rate: int, n_fft: int, f_min: float, f_max: Optional[float], scale: str):
        super().__init__()
        filters = kaldi_mel_filterbank if scale == "kaldi" else mel_filterbank
        fb = filters(sample_rate, n_fft, n_mels, f_min, f_max)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)  # (n_mels, n_freq)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        """(..., n_freq, frames) -> (..., n_mels, frames)."""
        return torch.matmul(self.fb, power)


class PeakNormalize(nn.Module):
    """Scale each waveform to a peak absolute amplitude of 1.

    Args:
        floor (float, optional): Peaks below this amplitude (full scale = 1) are treated as this, so
            near-silence is boosted by at most ``1 / floor`` (60 dB) instead of being blown up to full
            scale. (Default: ``1e-3``)

    Shape:
        - Input: ``(..., time)`` waveform.
        - Output: same shape, each waveform (last axis) scaled on its own.
    """

    def __init__(self, floor: float = 1e-3):
        super().__init__()
        self.floor = floor

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., time) -> same shape, peak 1 (or less, for a peak under ``floor``)."""
        return wave / wave.abs().amax(-1, keepdim=True).clamp_min(self.floor)


class PreEmphasis(nn.Module):
    """First-order high-pass ``y[t] = x[t] - coef * x[t - 1]`` (``y[0] = x[0]``).

    Args:
        coef (float): Filter coefficient, in [0, 1). ``0`` passes the waveform through.

    Shape:
        - Input: ``(..., time)`` waveform.
        - Output: same shape.
    """

    def __init__(self, coef: float):
        super().__init__()
        self.coef = coef

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., time) -> same shape."""
        if self.coef == 0:
            return wave
        return torch.cat([wave[..., :1], wave[..., 1:] - self.coef * wave[..., :-1]], dim=-1)


class LogMel(nn.Module):
    """The whole front end, waveform to model input, as ``config`` (a :class:`FeatureConfig`) says:
    peak normalisation -> pre-emphasis -> power STFT -> mel filterbank -> compression -> fixed affine.

    With the defaults (no pre-emphasis, periodic window, Slaney mels, ``log1p``) the output is identical
    to ``np.log1p(librosa.feature.melspectrogram(y=..., sr=..., n_fft=..., hop_length=..., win_length=...,
    n_mels=...))``. With ``compression="log"`` it is ``log(mel + 1e-5)``; either is then mapped to
    ``(x + config.offset) / config.scale``. The AudioSet backbones' front end
    (:data:`audioclf.backbones.BACKBONES`) is one setting of these fields.

    Args:
        config (FeatureConfig, optional): Every feature setting, sample rate (Hz) and STFT sizes (samples)
            included. (Default: ``FeatureConfig()``)

    Shape:
        - Input: ``(..., time)`` waveform in [-1, 1] at ``config.sample_rate``.
        - Output: ``(..., n_mels, 1 + time // hop_length)`` features.

    Example:
        >>> LogMel(FeatureConfig(n_mels=64))(torch.zeros(2, 22050)).shape   # one second, two clips
        torch.Size([2, 64, 87])
    """

    def __init__(self, config: Optional[FeatureConfig] = None):
        super().__init__()
        c = config or FeatureConfig()
        self.config = c
        self.peak = PeakNormalize() if c.peak_normalize else nn.Identity()
        self.preemphasis = PreEmphasis(c.preemphasis)
        self.spectrogram = Spectrogram(c.n_fft, c.hop_length, c.win_length, periodic=c.window == "periodic")
        self.mel = MelScale(c.n_mels, c.sample_rate, c.n_fft, c.f_min, c.f_max, scale=c.mel_scale)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., time) waveform in [-1, 1] -> (..., n_mels, 1 + time // hop_length) features."""
        c = self.config
        mel = self.mel(self.spectrogram(self.preemphasis(self.peak(wave))))
        x = torch.log1p(mel) if c.compression == "log1p" else torch.log(mel + LOG_FLOOR)
        return x if (c.offset, c.scale) == (0.0, 1.0) else (x + c.offset) / c.scale


class Normalize(nn.Module):
    """Standardise features with statistics of the training split: ``(x - mean) / std``.

    ImageNet-trained convolutions expect roughly zero-mean, unit-variance input; log1p mels are
    neither. ``mean`` and ``std`` are buffers of shape ``(n_mels, 1)`` (per band) saved with the model;
    until :meth:`fit` sets them they are 0 and 1, the identity.

    Args:
        n_mels (int): Mel bands of the features.

    Shape:
        - Input: ``(..., n_mels, frames)`` features.
        - Output: same shape, standardised.

    Example:
        >>> logmel = LogMel(FeatureConfig(n_mels=64))
        >>> norm = Normalize(64).fit(logmel(w) for w in torch.randn(3, 22050))  # the training clips, one at a time
        >>> norm(logmel(torch.randn(2, 22050))).shape
        torch.Size([2, 64, 87])
    """

    def __init__(self, n_mels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels, 1))
        self.register_buffer("std", torch.ones(n_mels, 1))

    @torch.no_grad()
    def fit(self, features, per_band: bool = True) -> "Normalize":
        """Set statistics from an iterable of (n_mels, frames) tensors (the training clips).

        Sums are accumulated in float64 one clip at a time, so a large dataset never needs one big tensor.
        """
        n, s, ss = 0, 0.0, 0.0
        for f in features:
            f = f.double()
            n, s, ss = n + f.shape[-1], s + f.sum(-1), ss + f.square().sum(-1)
        if n == 0:
            raise AudioclfError("cannot fit normalisation statistics on zero frames")
        if not per_band:
            n, s, ss = n * s.numel(), s.sum().expand_as(s), ss.sum().expand_as(ss)
        mean = s / n
        std = (ss / n - mean.square()).clamp_min(0).sqrt()
        self.mean.copy_(mean.unsqueeze(1).float())
        self.std.copy_(std.clamp_min(1e-5).unsqueeze(1).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_mels, frames) -> same shape, standardised."""
        return (x - self.mean) / self.std
