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

LOG_FLOOR = 1e-5  # compression="log": log(mel + LOG_FLOOR), so silence stays finite (EfficientAT's floor)


class Spectrogram(nn.Module):
    """Power spectrogram of a centred, zero-padded STFT with a Hann window.

    Args:
        n_fft (int, optional): Size of FFT, creates ``n_fft // 2 + 1`` bins. (Default: ``1024``)
        hop_length (int, optional): Samples between frames. (Default: ``256``)
        win_length (int, optional): Window size in samples, ``<= n_fft``; a shorter window is centred in
            the FFT frame. (Default: ``1024``)
        periodic (bool, optional): Periodic Hann window (librosa's, for spectral analysis) or symmetric
            (``periodic=False``, the one EfficientAT's models were trained with). (Default: ``True``)
    """

    def __init__(self, n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024, periodic: bool = True):
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


def kaldi_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                         f_max: Optional[float] = None) -> np.ndarray:
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
        n_fft (int): FFT size the spectrogram was computed with.
        f_min (float, optional): Lowest filter edge in Hz. (Default: ``0.0``)
        f_max (float or None, optional): Highest filter edge in Hz; ``None`` = ``sample_rate / 2``.
            (Default: ``None``)
        scale (str, optional): ``"slaney"`` (``librosa.filters.mel``: Slaney's scale, area-normalised) or
            ``"kaldi"`` (:func:`kaldi_mel_filterbank`). (Default: ``"slaney"``)
    """

    def __init__(self, n_mels: int, sample_rate: int, n_fft: int, f_min: float = 0.0,
                 f_max: Optional[float] = None, scale: str = "slaney"):
        super().__init__()
        filters = kaldi_mel_filterbank if scale == "kaldi" else mel_filterbank
        fb = filters(sample_rate, n_fft, n_mels, f_min, f_max)
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


class PreEmphasis(nn.Module):
    """First-order high-pass ``y[t] = x[t] - coef * x[t - 1]`` (``y[0] = x[0]``): (..., time) -> same shape.

    Args:
        coef (float): Filter coefficient, in [0, 1). ``0`` passes the waveform through.
    """

    def __init__(self, coef: float):
        super().__init__()
        self.coef = coef

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if self.coef == 0:
            return wave
        return torch.cat([wave[..., :1], wave[..., 1:] - self.coef * wave[..., :-1]], dim=-1)


class LogMel(nn.Module):
    """The whole front end, waveform to model input, as ``config`` (a :class:`FeatureConfig`) says:
    peak normalisation -> pre-emphasis -> power STFT -> mel filterbank -> compression -> fixed affine.

    With the defaults (no pre-emphasis, periodic window, Slaney mels, ``log1p``) the output is identical
    to ``np.log1p(mel_gain * librosa.feature.melspectrogram(y=..., sr=..., n_fft=..., hop_length=...,
    win_length=..., n_mels=...))``. With ``compression="log"`` it is ``log(mel + 1e-5)``; either is then
    mapped to ``(x + config.offset) / config.scale``. The AudioSet backbones' front end
    (:data:`audioclf.model.BACKBONES`) is one setting of these fields.

    Args:
        config (FeatureConfig, optional): Feature parameters. (Default: ``FeatureConfig()``)

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
        x = torch.log1p(c.mel_gain * mel) if c.compression == "log1p" else torch.log(mel + LOG_FLOOR)
        return x if (c.offset, c.scale) == (0.0, 1.0) else (x + c.offset) / c.scale


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
