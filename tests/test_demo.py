"""The README's first command: ``audioclf demo`` trains and evaluates on the built-in synthetic data."""

import json

import pytest

from audioclf.cli import main

pytestmark = pytest.mark.slow


def test_demo_trains_and_evaluates_on_unseen_clips(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    run = tmp_path / "run"
    for name in ("best.pt", "metrics.csv", "curves.png", "eval/metrics.json", "eval/confusion_matrix.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_clips"] == 50  # the held-out clips, not the training data
    assert metrics["accuracy"] >= 0.8, metrics["accuracy"]  # 5 classes: chance is 0.2
    assert "run directory" in capsys.readouterr().out
