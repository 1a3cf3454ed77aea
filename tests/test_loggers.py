"""Experiment tracking: --logger tensorboard and --logger mlflow get the rows of metrics.csv and the config,
offline (TensorBoard event files and MLflow's local file store in the run directory)."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from audioclf.cli import build_parser, config_from_args
from audioclf.config import AudioclfError
from audioclf.loggers import open_tracker
from audioclf.rundir import RunDir
from audioclf.train import fit



def config(data_dir, out, *flags):
    args = build_parser().parse_args(["train", str(data_dir), "--out", str(out), "--backbone", "resnet18",
                                      "--no-pretrained", "--sample-rate", "16000", "--duration", "1.0",
                                      "--batch-size", "8", "--val-split", "0.25", "--quiet", *flags])
    return config_from_args(args)


def metrics(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tensorboard_gets_every_metrics_row(synth_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    fit(config(synth_dir, run, "--epochs", "2", "--logger", "tensorboard"), run)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    rows = metrics(run)
    for key in ("val_loss", "train_acc", "lr"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
               [(int(r["epoch"]), pytest.approx(float(r[key]), rel=1e-6)) for r in rows]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "train.logger: tensorboard" in config_text and "model.backbone: resnet18" in config_text


@pytest.mark.slow
def test_mlflow_local_store_gets_params_and_metrics_and_a_resume_continues_the_run(synth_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    fit(config(synth_dir, run, "--epochs", "1", "--logger", "mlflow"), run)
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    run_id = json.loads(RunDir(run).mlflow_run.read_text())["run_id"]
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.params["train.logger"] == "mlflow"
    assert got.data.params["model.backbone"] == "resnet18" and got.data.params["train.epochs"] == "1"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")]
    assert history == [(int(r["epoch"]), pytest.approx(float(r["val_loss"]))) for r in metrics(run)]

    fit(config(synth_dir, run, "--epochs", "2", "--logger", "mlflow", "--resume"), run, resume=True)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [1, 2]  # the same MLflow run
    assert len(client.search_runs([got.info.experiment_id])) == 1


def test_the_default_logs_nowhere_else(tmp_path):
    tracker = open_tracker("csv", tmp_path)
    tracker.start({"train": {"lr": 1.0}})
    tracker.log({"epoch": 1, "val_loss": 0.5})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, extra", [("tensorboard", "audioclf[tensorboard]"), ("mlflow", "audioclf[mlflow]")])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, name, extra):
    for module in ("tensorboard", "torch.utils.tensorboard", "mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(AudioclfError, match=f"--logger {name} needs .*{extra.replace('[', '.').replace(']', '.')}"):
        open_tracker(name, tmp_path)


def test_an_unknown_logger_is_refused(synth_dir, tmp_path):
    with pytest.raises(SystemExit):  # argparse: invalid choice
        config(synth_dir, tmp_path / "run", "--logger", "wandb")
    with pytest.raises(AudioclfError, match="logger='wandb'"):
        open_tracker("wandb", tmp_path)
