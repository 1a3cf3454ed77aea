"""Training-only augmentation on batches of log-mel features, on any device.

Every transform samples its random parameters from a ``torch.Generator`` (CPU) separately from
applying them, so a run is reproducible from its seed and resumable from a saved generator state.
In ``eval()`` mode each transform is the identity. Their settings are arguments without defaults, or
an :class:`~audioclf.config.AugmentConfig`: the defaults live in the config only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import AugmentConfig, FeatureConfig
from .errors import AudioclfError
from .features import LOG_FLOOR


class _AxisMasking(nn.Module):
    """Zero out ``n_masks`` bands of random width ``[0, max_width]`` along one axis, per example.

    Zero in log1p-mel space is silence, so a masked region reads as "nothing there" rather than noise.

    Args:
        max_width (int): Widest mask, in mel bands (frequency) or frames (time); ``0`` turns masking off.
        n_masks (int): Masks per example; they may overlap.
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)
        max_fraction (float, optional): A mask covers at most this fraction of the axis (SpecAugment's
            ``p``), in [0, 1]. (Default: ``1.0``, no cap)

    Shape:
        - Input: ``(batch, n_mels, frames)`` features.
        - Output: same shape; masked in training mode only.
    """

    axis: int  # -2 (frequency) or -1 (time) of (batch, n_mels, frames)

    def __init__(self, max_width: int, n_masks: int, generator: Optional[torch.Generator] = None,
                 max_fraction: float = 1.0):
        super().__init__()
        if max_width < 0 or n_masks < 0:
            raise AudioclfError(f"mask max_width={max_width} and n_masks={n_masks} must be >= 0")
        if not 0.0 <= max_fraction <= 1.0:
            raise AudioclfError(f"mask max_fraction={max_fraction} must be in [0, 1]")
        self.max_width, self.n_masks, self.max_fraction = max_width, n_masks, max_fraction
        self.generator = generator

    def sample(self, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask starts and widths, each (batch, n_masks), with ``start + width <= size``; a width is at
        most ``max_width`` and at most ``max_fraction * size`` (SpecAugment's p)."""
        widest = min(self.max_width, int(self.max_fraction * size))
        width = torch.randint(0, widest + 1, (batch, self.n_masks), generator=self.generator)
        start = (torch.rand(batch, self.n_masks, generator=self.generator) * (size - width + 1)).long()
        return start, width

    @staticmethod
    def mask(size: int, start: torch.Tensor, width: torch.Tensor, device) -> torch.Tensor:
        """(batch, size) boolean, True where any mask covers."""
        pos = torch.arange(size, device=device).view(1, 1, -1)
        start, width = start.to(device).unsqueeze(-1), width.to(device).unsqueeze(-1)
        return ((pos >= start) & (pos < start + width)).any(1)

    def mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """A boolean mask broadcastable to ``x`` (batch, n_mels, frames), or None when nothing is masked."""
        if not self.training or self.n_masks == 0 or self.max_width == 0:
            return None
        size = x.shape[self.axis]
        m = self.mask(size, *self.sample(x.shape[0], size), x.device)
        return m.unsqueeze(-1) if self.axis == -2 else m.unsqueeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> same shape, masked in training mode."""
        m = self.mask_for(x)
        return x if m is None else x.masked_fill(m, 0.0)


class FrequencyMasking(_AxisMasking):
    """SpecAugment frequency masks: bands of up to ``max_width`` mel bands zeroed, per example.
    Arguments and shapes as :class:`_AxisMasking`'s.

    Example:
        >>> mask = FrequencyMasking(max_width=15, n_masks=2, generator=torch.Generator().manual_seed(0))
        >>> mask.train()(torch.ones(4, 80, 431)).shape   # eval() would pass the input through
        torch.Size([4, 80, 431])
    """

    axis = -2


class TimeMasking(_AxisMasking):
    """SpecAugment time masks: spans of up to ``max_width`` frames (and ``max_fraction`` of the frames)
    zeroed, per example. Arguments and shapes as :class:`_AxisMasking`'s."""

    axis = -1


class RandomTimeShift(nn.Module):
    """Roll each example along time by a random whole number of frames in ``[-max_fraction * frames,
    +max_fraction * frames]``.

    A fixed-length clip (ESC-50's 5 s) otherwise always shows its event at the same place; the roll is
    circular so no frames are lost or invented.

    Args:
        max_fraction (float): Largest shift as a fraction of the frames, in [0, 1]; ``0`` turns it off.
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)

    Shape:
        - Input: ``(batch, n_mels, frames)`` features.
        - Output: same shape; shifted in training mode only.
    """

    def __init__(self, max_fraction: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 0.0 <= max_fraction <= 1.0:
            raise AudioclfError(f"time shift max_fraction={max_fraction} must be in [0, 1]")
        self.max_fraction, self.generator = max_fraction, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> same shape."""
        frames = x.shape[-1]
        most = int(self.max_fraction * frames)
        if not self.training or most == 0:
            return x
        shift = torch.randint(-most, most + 1, (x.shape[0],), generator=self.generator).to(x.device)
        idx = (torch.arange(frames, device=x.device).view(1, -1) - shift.view(-1, 1)) % frames
        return x.gather(-1, idx.unsqueeze(1).expand_as(x))


class RandomTimeStretch(nn.Module):
    """Stretch each example along time by a random factor in ``[1 / (1 + max_fraction), 1 + max_fraction]``
    (log-uniform), then crop or zero-pad it back to its length at a random offset.

    A dog barks faster or slower, an engine idles at another rate: the classic time-stretch
    augmentation of environmental-sound work (Salamon & Bello, 2017), done on the spectrogram by
    linear interpolation between frames, so the pitch stays where it was.

    Args:
        max_fraction (float): The largest stretch is by a factor ``1 + max_fraction`` (and the largest
            squeeze by its inverse); ``0`` turns it off. ``0.2``: between 0.83x and 1.2x the duration.
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)

    Shape:
        - Input: ``(batch, n_mels, frames)`` features.
        - Output: same shape; stretched in training mode only.
    """

    def __init__(self, max_fraction: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if max_fraction < 0:
            raise AudioclfError(f"time stretch max_fraction={max_fraction} must be >= 0")
        self.max_fraction, self.generator = max_fraction, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> same shape."""
        if not self.training or self.max_fraction == 0:
            return x
        batch, frames = x.shape[0], x.shape[-1]
        most = math.log1p(self.max_fraction)
        factor = torch.exp((torch.rand(batch, generator=self.generator) * 2 - 1) * most)
        offset = torch.rand(batch, generator=self.generator)
        out = torch.zeros_like(x)
        for i in range(batch):  # one length per example; 16 small interpolations cost well under a millisecond
            n = max(1, int(round(frames * float(factor[i]))))
            y = torch.nn.functional.interpolate(x[i:i + 1], size=n, mode="linear", align_corners=False)[0]
            start = int(offset[i] * (abs(n - frames) + 1))
            if n >= frames:
                out[i] = y[..., start:start + frames]
            else:
                out[i, ..., start:start + n] = y
        return out


class RandomFrequencyShift(nn.Module):
    """Shift each example along the mel axis by a random whole number of bands in ``[-max_bands,
    +max_bands]``, zero-filling the bands shifted in.

    Above 1 kHz the mel scale is logarithmic, so a shift of k bands scales those frequencies by a
    constant factor, as a different voice or a re-pitched sound would (about 4.4 % per band at 80 bands
    and 22.05 kHz): vocal-tract-length perturbation, for speaker-independent speech.

    Args:
        max_bands (int): Largest shift in mel bands; ``0`` turns it off.
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)

    Shape:
        - Input: ``(batch, n_mels, frames)`` features.
        - Output: same shape; shifted in training mode only.
    """

    def __init__(self, max_bands: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        if max_bands < 0:
            raise AudioclfError(f"frequency shift max_bands={max_bands} must be >= 0")
        self.max_bands, self.generator = max_bands, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> same shape."""
        if not self.training or self.max_bands == 0:
            return x
        n_mels = x.shape[-2]
        shift = torch.randint(-self.max_bands, self.max_bands + 1, (x.shape[0],), generator=self.generator).to(x.device)
        src = torch.arange(n_mels, device=x.device).view(1, -1) - shift.view(-1, 1)  # (batch, n_mels)
        inside = ((src >= 0) & (src < n_mels)).unsqueeze(-1)
        out = x.gather(-2, src.clamp(0, n_mels - 1).unsqueeze(-1).expand_as(x))
        return out.masked_fill(~inside, 0.0)


class RandomGain(nn.Module):
    """Scale the mel power by a random gain in ``[-max_db, +max_db]`` dB, per example.

    The features' compression and fixed affine map are undone, the mel power is scaled and the features
    are made again, so the gain is exact for every front end (``log1p``, ``log(x + 1e-5)``, with or
    without ``(x + offset) / scale``).

    Args:
        max_db (float): Largest gain in dB (of power); ``0`` turns it off.
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)
        features (FeatureConfig, optional): How the features were made: their compression, offset and
            scale. (Default: ``FeatureConfig()``)

    Shape:
        - Input: ``(batch, ...)`` features, e.g. ``(batch, n_mels, frames)``.
        - Output: same shape; one gain per example, in training mode only.

    Example:
        >>> f = FeatureConfig(sample_rate=16000)
        >>> gain = RandomGain(12.0, torch.Generator().manual_seed(0), f).train()
        >>> gain(LogMel(f)(wave))   # as LogMel(f)(wave * 10 ** (db / 20)) for a db drawn in [-12, 12]
    """

    def __init__(self, max_db: float, generator: Optional[torch.Generator] = None,
                 features: Optional[FeatureConfig] = None):
        super().__init__()
        self.max_db, self.generator, self.features = max_db, generator, features or FeatureConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, ...) features -> same shape."""
        if not self.training or self.max_db <= 0:
            return x
        db = (torch.rand(x.shape[0], generator=self.generator) * 2 - 1) * self.max_db
        gain = (10 ** (db / 10)).to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return from_power(to_power(x, self.features) * gain, self.features)


def to_power(x: torch.Tensor, features: FeatureConfig) -> torch.Tensor:
    """Features -> the mel power they were made from: ``features``' affine map and compression undone."""
    y = x * features.scale - features.offset
    return torch.expm1(y) if features.compression == "log1p" else (torch.exp(y) - LOG_FLOOR).clamp_min(0)


def from_power(power: torch.Tensor, features: FeatureConfig) -> torch.Tensor:
    """Mel power -> features, as ``features`` make them (the inverse of :func:`to_power`)."""
    y = torch.log1p(power) if features.compression == "log1p" else torch.log(power + LOG_FLOOR)
    return (y + features.offset) / features.scale


class SpecAugment(nn.Module):
    """Gain, time stretch, time shift, frequency shift, then frequency and time masking, per example,
    training only.

    Args:
        config (AugmentConfig, optional): Every augmentation setting: mask widths (mel bands, frames) and
            counts, shift and stretch fractions, gain in dB. (Default: ``AugmentConfig()``)
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)
        features (FeatureConfig, optional): How the features were made, for the gain (see
            :class:`RandomGain`). (Default: ``FeatureConfig()``)

    Shape:
        - Input: ``(batch, n_mels, frames)`` features.
        - Output: same shape; the input itself in ``eval()`` mode.

    Example:
        >>> aug = SpecAugment(config.augment, features=config.features).train()
        >>> aug.set_generator(torch.Generator().manual_seed(seed + epoch))  # the same draws on a rerun
        >>> x = aug(x)
    """

    def __init__(self, config: Optional[AugmentConfig] = None, generator: Optional[torch.Generator] = None,
                 features: Optional[FeatureConfig] = None):
        super().__init__()
        c = config or AugmentConfig()
        self.gain = RandomGain(c.gain_db, generator, features)
        self.stretch = RandomTimeStretch(c.time_stretch, generator)
        self.shift = RandomTimeShift(c.time_shift, generator)
        self.pitch = RandomFrequencyShift(c.freq_shift, generator)
        self.freq = FrequencyMasking(c.freq_mask_width, c.n_freq_masks, generator)
        self.time = TimeMasking(c.time_mask_width, c.n_time_masks, generator, c.time_mask_fraction)

    def set_generator(self, generator: Optional[torch.Generator]) -> None:
        """Draw every random parameter from ``generator`` (the trainer seeds one per epoch)."""
        for m in (self.gain, self.stretch, self.shift, self.pitch, self.freq, self.time):
            m.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> same shape."""
        x = self.pitch(self.shift(self.stretch(self.gain(x))))
        masks = [m for m in (self.freq.mask_for(x), self.time.mask_for(x)) if m is not None]
        if not masks:
            return x
        # one pass over the batch instead of one per mask kind: the data path stays a rounding error
        return x.masked_fill(masks[0] | masks[1] if len(masks) == 2 else masks[0], 0.0)


def active_power(power: torch.Tensor, floor_db: float = 40.0) -> torch.Tensor:
    """Loudness of each example: its mean frame power over the frames within ``floor_db`` dB of its loudest,
    so the silence that pads a short sound does not make it look quiet.

    Args:
        power (torch.Tensor): ``(batch, n_mels, frames)`` mel power (:func:`to_power`).
        floor_db (float, optional): frames this far below the loudest one are silence, in dB. (Default: ``40.0``)

    Returns:
        torch.Tensor: ``(batch,)``, in units of ``power`` (0 for an all-silent example).
    """
    frames = power.sum(-2)  # (batch, frames)
    active = frames >= frames.amax(-1, keepdim=True) * 10 ** (-floor_db / 10)
    return (frames * active).sum(-1) / active.sum(-1)


def active_extent(power: torch.Tensor, floor_db: float = 25.0, smooth: int = 5) -> torch.Tensor:
    """Where each example's sound is: the frames from its first to its last within ``floor_db`` dB of its
    loudest, a clip's "active part" (the extent an annotator would mark, gaps between barks included).

    Args:
        power (torch.Tensor): ``(batch, n_mels, frames)`` mel power (:func:`to_power`).
        floor_db (float, optional): frames this far below the loudest one are not the sound, in dB. (Default: ``25.0``)
        smooth (int, optional): frame power is averaged over this many frames first (5: 50 ms at a 10-ms hop),
            so a single click does not stand for the sound. (Default: ``5``)

    Returns:
        torch.Tensor: ``(batch, frames)``, 1.0 inside the extent, 0.0 outside (all 0 for a silent example).
    """
    frames = torch.nn.functional.avg_pool1d(power.sum(-2, keepdim=True), smooth, 1, smooth // 2,
                                            count_include_pad=False)[:, 0, :power.shape[-1]]
    on = (frames >= frames.amax(-1, keepdim=True) * 10 ** (-floor_db / 10)) & (frames > 0)
    index = torch.arange(on.shape[-1], device=on.device)
    first = torch.where(on, index, on.shape[-1]).amin(-1, keepdim=True)
    last = torch.where(on, index, -1).amax(-1, keepdim=True)
    return ((index >= first) & (index <= last)).to(power.dtype)


def roll_time(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Roll each example of ``x`` (``(batch, ..., frames)``) along its last axis by its own ``shifts[i]``
    frames, as ``torch.roll`` would one at a time."""
    frames = x.shape[-1]
    src = (torch.arange(frames, device=x.device) - shifts.to(x.device).view(-1, 1)) % frames  # (batch, frames)
    return x.gather(-1, src.view(x.shape[0], *([1] * (x.ndim - 2)), frames).expand_as(x))


def mix(x: torch.Tensor, y: torch.Tensor, fraction: float, max_db: float, features: FeatureConfig,
        generator: Optional[torch.Generator] = None, max_clips: int = 2, *, frame_targets: bool = False):
    """Sum a ``fraction`` of the examples with other clips of the batch, at random level differences,
    and give each sum the union of the clips' classes: a model trained on clips of one sound each learns
    that several can be present at once (multilabel only).

    The sum is made in mel power, which adds as the power of summed waveforms does (their cross terms
    average out), so it holds for every front end (see :func:`to_power`). An example's partners are its
    successors in a random cyclic order of the batch, so no clip is mixed with itself or twice. Level
    differences are between the clips' loudness (:func:`active_power`), not their recorded levels: those
    spread over some 30 dB in ESC-50, so a partner scaled from its own level would often be inaudible yet
    labelled present, or drown the clip it joins.

    Args:
        x (torch.Tensor): ``(batch, n_mels, frames)`` features.
        y (torch.Tensor): ``(batch, classes)`` multi-hot targets.
        fraction (float): share of the examples mixed, in [0, 1]; ``0`` turns it off.
        max_db (float): each partner's loudness is set to the example's, times a gain in ``[-max_db, +max_db]`` dB.
        features (FeatureConfig): how the features were made.
        generator (torch.Generator, optional): Source of randomness (CPU). (Default: the global RNG)
        max_clips (int, optional): most clips in one sum: a mixed example takes from 1 to ``max_clips - 1``
            partners, as many as the batch allows. (Default: ``2``)
        frame_targets (bool, optional): place every clip, the example's own and each partner, at a random
            time (a circular roll, as SpecAugment's time shift, which this replaces) and also return where
            each class sounds: its clips' active parts (:func:`active_extent`). (Default: ``False``)

    Returns:
        the features, mixed where drawn (same shape), the targets, united where mixed, and with
        ``frame_targets`` each class's presence at each frame, ``(batch, frames, classes)`` (else ``None``).
    """
    batch = x.shape[0]
    mixing = fraction > 0 and batch >= 2
    if not (mixing or frame_targets):
        return x, y, None
    power = to_power(x, features)  # every clip converted once: as an example, a partner and for its extent
    strong = extent = None
    if frame_targets:
        extent = active_extent(power)
        own = torch.randint(0, x.shape[-1], (batch,), generator=generator)
        x, power, extent = roll_time(x, own), roll_time(power, own), roll_time(extent, own)
        strong = extent.unsqueeze(-1) * y.unsqueeze(1).to(extent.dtype)
    if not mixing:
        return x, y, strong
    chosen = torch.rand(batch, generator=generator) < fraction
    db = (torch.rand(batch, generator=generator) * 2 - 1) * max_db
    cycle = torch.randperm(batch, generator=generator)
    most = min(max_clips, batch) - 1  # partners an example may take
    if most > 1:
        partners = torch.randint(1, most + 1, (batch,), generator=generator)
        db = torch.stack([db] + [(torch.rand(batch, generator=generator) * 2 - 1) * max_db for _ in range(most - 1)])
    else:
        partners, db = torch.ones(batch, dtype=torch.long), db[None]
    place = torch.empty_like(cycle)
    place[cycle] = torch.arange(batch)  # each example's place in the cycle
    rows = chosen.nonzero().squeeze(1)
    on, at = rows.to(x.device), rows.to(y.device)
    own = power[on]
    level, total = active_power(own), own.clone()
    united = y.clone()
    for k in range(1, most + 1):  # the k-th successor in the cycle
        partner = cycle[(place[rows] + k) % batch].to(x.device)
        other, partner_y = power[partner], y[partner.to(y.device)]
        if frame_targets:  # a partner also lands at a random time of the clip it joins
            at_time = torch.randint(0, x.shape[-1], (len(rows),), generator=generator)
            other, where = roll_time(other, at_time), roll_time(extent[partner], at_time)
        other_level = active_power(other)
        taken = (partners[rows] >= k).to(x.device)
        gain = (10 ** (db[k - 1, rows] / 10)).to(x.device, x.dtype) * taken
        gain = torch.where(other_level > 0, gain * level / other_level.clamp_min(torch.finfo(x.dtype).tiny), gain)
        total += gain.view(-1, 1, 1) * other
        united[at] = torch.where(taken.to(y.device).view(-1, 1), torch.maximum(united[at], partner_y), united[at])
        if frame_targets:
            joined = (where * taken.view(-1, 1)).unsqueeze(-1) * partner_y.unsqueeze(1).to(where.dtype)
            strong[at] = torch.maximum(strong[at], joined)
    x = x.clone()
    x[on] = from_power(total, features)
    return x, united, strong


def mixup(x: torch.Tensor, y: torch.Tensor, n_classes: int, alpha: float,
          generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each example with a random partner from the batch (Zhang et al., 2018).

    Args:
        x: (batch, ...) features. y: (batch,) integer labels, or (batch, n_classes) multi-hot targets.
    Returns:
        mixed x (same shape) and soft targets (batch, n_classes), each mixed with the same weight as its
        features. With ``alpha <= 0`` the input is returned with one-hot (or the given) targets.
    """
    target = torch.nn.functional.one_hot(y, n_classes).to(x.dtype) if y.ndim == 1 else y.to(x.dtype)
    if alpha <= 0:
        return x, target
    lam = _beta(alpha, x.shape[0], generator)
    lam = torch.maximum(lam, 1 - lam).to(x.device, x.dtype)  # the original stays dominant: its label is kept
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    lx = lam.view(-1, *([1] * (x.ndim - 1)))
    return lx * x + (1 - lx) * x[perm], lam[:, None] * target + (1 - lam[:, None]) * target[perm]


def _beta(alpha: float, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Beta(alpha, alpha) samples by inverse CDF of uniform draws from ``generator`` (exact, one draw per
    sample, any alpha): torch's Beta and Gamma samplers take no generator, so would not be seedable.
    Rejection methods such as Johnk's stall for alpha above ~8 (acceptance falls like 4**-alpha)."""
    from scipy.special import betaincinv

    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.from_numpy(betaincinv(alpha, alpha, u.numpy())).float()
