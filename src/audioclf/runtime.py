"""Where and how work runs: the device, mixed precision, and how many processes and threads decode
audio. Training and inference both take these decisions from here."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .config import AudioclfError


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The mixed-precision dtype worth using on ``device``, or None where it would not pay.

    CUDA: bfloat16 where supported, else float16 (with a gradient scaler). CPU: bfloat16 only where the
    CPU computes it natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it and it is slower than fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            native = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # private, hence the guard
        except (AttributeError, RuntimeError):
            native = False
        return torch.bfloat16 if native else None
    return None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AudioclfError(f"device={name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AudioclfError(f"Unsupported device={name!r}; choose auto, cpu, cuda or cuda:N") from None


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity (what a container or ``taskset`` allows), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_workers(main_process_busy: bool = True) -> int:
    """Worker processes for a pass over many files: one per core, less one for the main process when it has
    work of its own (running a model, computing features on a GPU); none on one core, where a worker only
    adds the cost of passing its results. No upper bound: a feature build whose workers each decode and
    compute their own clips scales with the cores (benchmarks/scale.py)."""
    cores = cpu_cores()
    if cores <= 1:
        return 0
    return cores - 1 if main_process_busy else cores
