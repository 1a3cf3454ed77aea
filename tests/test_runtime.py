"""Worker policy: how many processes decode and featurise."""

import pytest

import audioclf.runtime as runtime


@pytest.mark.parametrize("cores, busy, idle", [(1, 0, 0), (2, 1, 2), (16, 15, 16), (64, 63, 64)])
def test_auto_workers_uses_every_core_it_may_run_on(monkeypatch, cores, busy, idle):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert runtime.cpu_cores() == cores
    assert runtime.auto_workers() == busy  # one core left to a main process with work of its own
    assert runtime.auto_workers(main_process_busy=False) == idle
