"""Feature extraction as small ``nn.Module``s over batched waveforms: Spectrogram -> MelScale -> log1p.

Fixed tensors (window, filterbank, statistics) are buffers, so ``.to(device)`` moves them and the
whole front end runs on the GPU in batch.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from .config import AudioclfError, FeatureConfig


class Spectrogram(nn.Module):
    """Power spectrogram of a centred, zero-padded STFT with a periodic Hann window.

    Args:
        n_fft (int, optional): Size of FFT, creates ``n_fft // 2 + 1`` bins. (Default: ``1024``)
        hop_length (int, optional): Samples between frames. (Default: ``256``)
        win_length (int, optional): Window size in samples, ``<= n_fft``. (Default: ``1024``)
    """

    def __init__(self, n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024):
        super().__init__()
        if not 0 < win_length <= n_fft:
            raise AudioclfError(f"win_length={win_length} must be in (0, n_fft={n_fft}]")
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)

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


def mel_filterbank(sample_rate: int = 22050, n_fft: int = 1024, n_mels: int = 80, f_min: float = 0.0,
                   f_max: Optional[float] = None) -> np.ndarray:
    """Slaney-normalised triangular mel filters, (n_mels, n_fft // 2 + 1) float32.

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


class MelScale(nn.Module):
    """Project a power spectrogram onto a Slaney-normalised mel filterbank (as ``librosa.filters.mel``).

    Args:
        n_mels (int): Number of mel bands. (Default: ``80``)
        sample_rate (int): Sample rate in Hz. (Default: ``22050``)
        n_fft (int): FFT size the spectrogram was computed with. (Default: ``1024``)
        f_min (float): Lowest filter edge in Hz. (Default: ``0.0``)
        f_max (float or None): Highest filter edge in Hz; ``None`` = ``sample_rate / 2``. (Default: ``None``)
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 22050, n_fft: int = 1024,
                 f_min: float = 0.0, f_max: Optional[float] = None):
        super().__init__()
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)  # (n_mels, n_freq)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        """(..., n_freq, frames) -> (..., n_mels, frames)."""
        return torch.matmul(self.fb, power)


class PeakNormalize(nn.Module):
    """Scale each waveform to a peak absolute amplitude of 1: (..., time) -> same shape.

    Args:
        floor (float, optional): peaks below this are treated as this, so near-silence is boosted by at
            most ``1 / floor`` (60 dB) instead of being blown up to full scale. (Default: ``1e-3``)
    """

    def __init__(self, floor: float = 1e-3):
        super().__init__()
        self.floor = floor

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return wave / wave.abs().amax(-1, keepdim=True).clamp_min(self.floor)


class LogMel(nn.Module):
    """``log1p`` of an 80-band mel power spectrogram scaled by ``config.mel_gain``, identical to
    ``np.log1p(mel_gain * librosa.feature.melspectrogram(y=..., sr=..., n_fft=..., hop_length=..., win_length=..., n_mels=...))``
    of the waveform, after peak normalisation when ``config.peak_normalize`` (the default).

    Args:
        config (FeatureConfig, optional): Feature parameters. (Default: ``FeatureConfig()``)
    """

    def __init__(self, config: Optional[FeatureConfig] = None):
        super().__init__()
        c = config or FeatureConfig()
        self.config = c
        self.peak = PeakNormalize() if c.peak_normalize else nn.Identity()
        self.spectrogram = Spectrogram(c.n_fft, c.hop_length, c.win_length)
        self.mel = MelScale(c.n_mels, c.sample_rate, c.n_fft, c.f_min, c.f_max)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., time) waveform in [-1, 1] -> (..., n_mels, 1 + time // hop_length) log-mel."""
        return self.mel_frames(self.peak(wave))

    def mel_frames(self, wave: torch.Tensor) -> torch.Tensor:
        """``forward`` after peak normalisation: (..., time) -> (..., n_mels, 1 + time // hop_length).
        Each frame depends on its own samples only, so a long clip can be taken in blocks of frames."""
        return torch.log1p(self.config.mel_gain * self.mel(self.spectrogram(wave)))


class Normalize(nn.Module):
    """Standardise features with statistics of the training split: ``(x - mean) / std``.

    ImageNet-trained convolutions expect roughly zero-mean, unit-variance input; log1p mels are
    neither. ``mean`` and ``std`` are buffers of shape ``(n_mels, 1)`` (per band) saved with the model.
    With ``per_clip`` each clip's own mean over time replaces ``mean``, per band.

    Args:
        n_mels (int, optional): Mel bands. (Default: ``80``)
        per_clip (bool, optional): Centre each clip on its own mean per band. (Default: ``False``)
    """

    def __init__(self, n_mels: int = 80, per_clip: bool = False):
        super().__init__()
        self.per_clip = per_clip
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
        return (x - (x.mean(-1, keepdim=True) if self.per_clip else self.mean)) / self.std
