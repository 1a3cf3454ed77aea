"""The README's first command: ``audioclf demo`` trains and evaluates on the built-in synthetic data."""

import json
from pathlib import Path

import pytest

from audioclf import demo, evaluate, train
from audioclf.cli import main


@pytest.mark.slow
def test_demo_trains_and_evaluates_on_unseen_clips(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    run = tmp_path / "run"
    for name in ("best.pt", "metrics.csv", "curves.png", "eval/metrics.json", "eval/confusion_matrix.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_clips"] == 50  # the held-out clips, not the training data
    assert metrics["accuracy"] >= 0.8, metrics["accuracy"]  # 5 classes: chance is 0.2
    assert "run directory" in capsys.readouterr().out


def test_the_demo_returns_its_results_and_the_command_prints_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda root, **kw: Path(root))
    monkeypatch.setattr(train, "fit", lambda config, out, **kw: {"best_val_loss": 0.5, "best_epoch": 3})
    monkeypatch.setattr(evaluate, "evaluate", lambda model, data, **kw: {"report": "the report", "n_clips": 50})
    result = demo.run_demo(tmp_path, quiet=True)
    assert capsys.readouterr().out == ""  # the library prints nothing
    assert result["train"]["best_epoch"] == 3 and result["eval"]["report"] == "the report"
    run = tmp_path / "run"
    assert (result["run_dir"], result["eval_dir"], result["test_dir"]) == (run, run / "eval", tmp_path / "test")

    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out == (
        f"the report\n\nrun directory: {run} (config.yaml, metrics.csv, curves.png, best.pt)\n"
        f"evaluation:    {run / 'eval'} (metrics.json, predictions.csv, confusion_matrix.png)\n"
        f"next: audioclf predict {run} {tmp_path / 'test' / 'tone'} | audioclf serve {run}\n")
