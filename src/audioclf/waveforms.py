"""Waveforms handed to the Python API (:class:`audioclf.predict.Classifier`): numpy arrays and torch tensors,
one clip or a batch of them, checked once and made mono float32 at the model's sample rate."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .audio import resample
from .errors import AudioclfError


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


def unbatch(audio, batch: Optional[bool]):
    """An array or tensor whose first axis is clips (``batch``) as a list of clips; a 2-D one without
    ``batch`` is refused: two mono clips and one stereo clip have the same shape."""
    is_array = isinstance(audio, (np.ndarray, torch.Tensor))
    ndim = audio.ndim if is_array else None
    if batch is None:
        if ndim == 2 and audio.shape[0] <= audio.shape[1]:  # taller than wide: as_waveform's "(time, channels)?"
            raise AudioclfError(f"a waveform of shape {tuple(audio.shape)} is ambiguous: pass batch=True if its rows "
                                f"are clips (one result each), batch=False if they are the channels of one clip")
        return audio
    if not batch:
        return audio
    if ndim not in (2, 3):
        raise AudioclfError(f"batch=True needs an array or tensor of shape (n, time) or (n, channels, time); got "
                            + (f"shape {tuple(audio.shape)}" if is_array else type(audio).__name__))
    return list(audio)
