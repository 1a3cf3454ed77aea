"""Exhaustion (issue 21): DataLoader workers die with the process that started them, even when it is killed
with SIGKILL; predict's and the feature store's loaders use that."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from _models import tiny_run  # noqa: F401 (a fixture)

from audioclf.runtime import worker_dies_with_parent

CHILD = textwrap.dedent("""
    import sys, time, torch
    from audioclf.runtime import dying_with_parent

    class Blocked(torch.utils.data.Dataset):
        def __len__(self):
            return 1000
        def __getitem__(self, i):
            time.sleep(3600)  # a worker blocked, as on a full pipe

    loader = torch.utils.data.DataLoader(Blocked(), num_workers=2, worker_init_fn=dying_with_parent())
    it = iter(loader)
    print(" ".join(str(w.pid) for w in it._workers), flush=True)
    next(it)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, waiting for its parent to be reaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_exhaustion_loader_workers_die_with_their_parent_on_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(map(_alive, workers))
        time.sleep(1.0)  # the workers are inside __getitem__ now
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "a worker outlived its killed parent"
    finally:
        parent.kill()
        for pid in locals().get("workers", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_exhaustion_predict_and_store_loaders_use_it(tiny_run):
    import audioclf

    clf = audioclf.load(tiny_run.run_dir, device="cpu")
    loader = clf._file_loader([tiny_run.data_dir / "tone" / "tone_000.wav"] * 3, 16000, 8000, num_workers=1)
    assert loader.worker_init_fn.func is worker_dies_with_parent and loader.worker_init_fn.args == (os.getpid(),)
    import inspect

    import audioclf.store as store

    assert "worker_init_fn=dying_with_parent()" in inspect.getsource(store)



