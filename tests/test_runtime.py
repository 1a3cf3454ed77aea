"""Worker policy: how many processes decode and featurise."""

import pytest

import audioclf.runtime as runtime


@pytest.mark.parametrize("cores, busy, idle", [(1, 0, 0), (2, 1, 2), (16, 15, 16), (64, 63, 64)])
def test_auto_workers_uses_every_core_it_may_run_on(monkeypatch, cores, busy, idle):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert runtime.cpu_cores() == cores
    assert runtime.auto_workers() == busy  # one core left to a main process with work of its own
    assert runtime.auto_workers(main_process_busy=False) == idle


@pytest.mark.parametrize("cores, workers, device, inside", [(2, 1, "cpu", 1), (16, 4, "cpu", 12), (2, 3, "cpu", 1),
                                                           (2, 0, "cpu", None), (2, 1, "meta", None)])
def test_cpu_threads_leave_the_workers_their_cores_and_come_back(monkeypatch, cores, workers, device, inside):
    import torch

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(16)
    try:
        with runtime.cpu_threads_beside(workers, torch.device(device)):
            assert torch.get_num_threads() == (16 if inside is None else inside)
        assert torch.get_num_threads() == 16
    finally:
        torch.set_num_threads(before)


def test_the_file_loader_runs_the_model_beside_its_workers(monkeypatch, tmp_path):
    """classify_files with decoding workers runs the model with fewer threads, and restores them after."""
    import torch

    from audioclf.predict import Classifier

    seen = []
    clf = Classifier.__new__(Classifier)
    clf.device = torch.device("cpu")
    monkeypatch.setattr(Classifier, "_run", lambda self, sources, head=None: iter([seen.append(torch.get_num_threads())]))
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = torch.utils.data.DataLoader([], num_workers=1)
        list(clf._run_loaded(loader))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
