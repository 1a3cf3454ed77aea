"""Where and how work runs: the device, mixed precision, how many processes and threads decode audio,
and torchrun's process group. Training and inference both take these decisions from here."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from datetime import timedelta
from typing import Iterator, Optional

import torch

from .errors import AudioclfError


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


def worker_dies_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (bind ``parent_pid`` with functools.partial): the worker is killed when
    the process that started it dies, even by SIGKILL, which gives it no chance to stop its workers; else an
    orphaned worker blocked on a full pipe lives on, holding its memory, deaf to SIGTERM.
    Linux's ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread that watches the parent's pid."""
    import signal
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    else:
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def dying_with_parent() -> functools.partial:
    """The ``worker_init_fn`` for this process's DataLoaders: :func:`worker_dies_with_parent`."""
    return functools.partial(worker_dies_with_parent, os.getpid())


@contextlib.contextmanager
def cpu_threads_beside(workers: int, device: torch.device) -> Iterator[None]:
    """For the block, torch's CPU threads in this process leave ``workers`` cores to worker processes (at
    least one thread stays); nothing on a GPU or without workers."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(threads, cpu_cores() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float = 24 * 3600) -> Iterator[torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1), join the process group for the block and leave it after; yield
    this rank's device: ``cuda:LOCAL_RANK`` with NCCL when ``device`` is CUDA, else ``device`` with gloo.
    Outside torchrun, yield ``device`` and do nothing else.

    ``timeout_s`` bounds each collective, a barrier included: long, because a barrier waits for the slowest
    rank's whole share of the work (torchrun ends every rank at once when one of them dies).
    """
    _, local_rank, world = dist_info()
    if world == 1:
        yield device
        return
    import torch.distributed as dist

    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise AudioclfError(f"torchrun process {local_rank} of this node has no GPU of its own (torch sees "
                                f"{torch.cuda.device_count()}): start at most that many with --nproc_per_node, or use "
                                f"--device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def barrier(device: torch.device) -> None:
    """Wait until every rank of the process group gets here; nothing outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(device_ids=[torch.cuda.current_device() if device.index is None else device.index]
                     if device.type == "cuda" else None)


def broadcast(value, device: torch.device):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself outside torchrun."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=device if device.type == "cuda" else None)
    return holder[0]


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while the block runs, when ``enabled``; the previous settings afterwards, so a
    library caller's process is left as it was."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # cuBLAS sums reproducibly only with a fixed workspace; read when CUDA first runs a matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel (CUDA's adaptive pooling backward) warns, not stops
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
