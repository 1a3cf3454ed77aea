"""The README's first command: ``audioclf demo`` fine-tunes the default backbone on the built-in synthetic data,
or offline trains ResNet-18 from scratch and says why."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from audioclf import demo, evaluate, train
from audioclf.backbones import BACKBONES, DEFAULT_BACKBONE
from audioclf.cli import main
from audioclf.weights import hub_path

from conftest import SHARED_DATA

SHARED_WEIGHTS = SHARED_DATA.parent / "weights" / BACKBONES[DEFAULT_BACKBONE].weights_file


def _eval_metrics(run: Path) -> dict:
    for name in ("best.pt", "metrics.csv", "curves.png", "eval/metrics.json", "eval/confusion_matrix.png"):
        assert (run / name).is_file(), name
    return json.loads((run / "eval" / "metrics.json").read_text())


def _trained(run: Path) -> dict:
    return torch.load(run / "best.pt", map_location="cpu", weights_only=True)["config"]["model"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_demo_fine_tunes_the_default_backbone_from_the_hub_cache(tmp_path, capsys):
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} is absent")
    cached = hub_path(BACKBONES[DEFAULT_BACKBONE])  # in the test's own empty TORCH_HOME (conftest)
    cached.parent.mkdir(parents=True)
    shutil.copy(SHARED_WEIGHTS, cached)
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    run = tmp_path / "run"
    metrics = _eval_metrics(run)
    assert metrics["n_clips"] == 50  # the held-out clips, not the training data
    assert metrics["accuracy"] >= 0.9, metrics["accuracy"]  # 5 classes: chance is 0.2
    model = _trained(run)
    assert (model["backbone"], model["pretrained"]) == (DEFAULT_BACKBONE, "audioset")
    out = capsys.readouterr().out
    assert f"model:         {DEFAULT_BACKBONE}, fine-tuned from its AudioSet weights\nrun directory" in out


@pytest.mark.slow
def test_demo_offline_trains_resnet18_from_scratch_and_says_why(tmp_path, capsys, caplog):
    # conftest: an empty TORCH_HOME and no downloads, as on a machine without network
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    run = tmp_path / "run"
    metrics = _eval_metrics(run)
    assert metrics["n_clips"] == 50
    assert metrics["accuracy"] >= 0.8, metrics["accuracy"]
    assert (_trained(run)["backbone"], _trained(run)["pretrained"]) == ("resnet18", "none")
    file = BACKBONES[DEFAULT_BACKBONE]
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "demo trains" in r.getMessage())
    for needed in (file.weights_file, file.weights_url, str(hub_path(file)), "ResNet-18 from scratch instead"):
        assert needed in warning, needed
    out = capsys.readouterr().out
    assert "model:         resnet18, from scratch\n" in out and file.weights_url in out


def _fake_stages(monkeypatch, seen: dict) -> None:
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda root, **kw: Path(root))

    def fit(config, out, **kw):
        seen["config"] = config
        return {"best_val_loss": 0.5, "best_epoch": 3}

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(evaluate, "evaluate", lambda model, data, **kw: {"report": "the report", "n_clips": 50})


def test_the_demo_fine_tunes_the_default_backbone_when_its_weights_can_be_had(tmp_path, monkeypatch):
    seen = {}
    _fake_stages(monkeypatch, seen)
    weights = tmp_path / "w.pt"
    monkeypatch.setattr(demo, "default_weights", lambda: (weights, None))
    result = demo.run_demo(tmp_path, quiet=True)
    config = seen["config"]
    assert config.model.backbone == DEFAULT_BACKBONE and config.model.weights_path == str(weights)
    assert config.features.sample_rate == 32000 and config.features.duration_s == 2.0  # its front end, the clips
    recipe = BACKBONES[DEFAULT_BACKBONE].recipe["train"]
    assert (config.train.lr, config.train.epochs) == (recipe["lr"], recipe["epochs"])  # as audioclf train does
    assert result["fallback"] is None and result["model"].startswith(DEFAULT_BACKBONE)


def test_the_demo_returns_its_results_and_the_command_prints_them(tmp_path, monkeypatch, capsys):
    seen = {}
    _fake_stages(monkeypatch, seen)  # conftest: no weights and no network, so the demo falls back
    result = demo.run_demo(tmp_path, quiet=True)
    assert capsys.readouterr().out == ""  # the library prints nothing
    assert seen["config"].model.backbone == "resnet18" and seen["config"].model.pretrained == "none"
    assert result["train"]["best_epoch"] == 3 and result["eval"]["report"] == "the report"
    run = tmp_path / "run"
    assert (result["run_dir"], result["eval_dir"], result["test_dir"]) == (run, run / "eval", tmp_path / "test")
    assert "downloads are disabled in tests" in result["fallback"]

    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out == (
        f"the report\n\nmodel:         resnet18, from scratch\n               {result['fallback']}\n"
        f"run directory: {run} (config.yaml, metrics.csv, curves.png, best.pt)\n"
        f"evaluation:    {run / 'eval'} (metrics.json, predictions.csv, confusion_matrix.png)\n"
        f"next: audioclf predict {run} {tmp_path / 'test' / 'tone'} | audioclf serve {run}\n")
