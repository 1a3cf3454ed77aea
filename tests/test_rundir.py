"""The run directory owns its files: their names, and the writers train.py calls."""

import csv
import logging

import matplotlib
import yaml

from audioclf.config import RunConfig
from audioclf.rundir import METRIC_FIELDS, RunDir, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(n):
    return [{"epoch": e, "lr": 1e-3 / e, "train_loss": 2.0 / e, "train_acc": 0.5, "val_loss": 1.5 / e, "val_acc": 0.4,
             "val_f1": 0.3, "epoch_s": 1.5, "clips_per_s": 100.0, "ignored": "x"} for e in range(1, n + 1)]


def test_metrics_round_trip_and_curves(tmp_path):
    run = RunDir(tmp_path)
    run.write_metrics(_rows(3))
    with open(run.metrics) as f:
        assert next(csv.reader(f)) == METRIC_FIELDS  # only the known columns, in order
    back = run.read_metrics()
    assert [r["epoch"] for r in back] == [1, 2, 3] and back[1]["val_loss"] == 0.75
    backend = matplotlib.get_backend()
    run.finish({"best_epoch": 3})
    assert run.curves.read_bytes()[:8] == PNG_MAGIC and '"best_epoch": 3' in run.summary.read_text()
    assert matplotlib.get_backend() == backend  # a notebook's backend is left alone
    assert RunDir(tmp_path / "new").read_metrics() == []


def test_an_empty_metrics_file_draws_nothing(tmp_path):
    (tmp_path / "m.csv").write_text(",".join(METRIC_FIELDS) + "\n")
    plot_curves(tmp_path / "m.csv", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_config_labels_skipped_and_test_fold(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.write_config(RunConfig(), ["dog", "rain"])
    assert RunConfig.from_dict(yaml.safe_load(run.config.read_text())) == RunConfig()
    assert run.labels.read_text().split() == ["[", '"dog",', '"rain"', "]"]
    with caplog.at_level(logging.WARNING):
        run.write_skipped([("a.wav", "cannot decode")])
    assert run.skipped.read_text().splitlines() == ["path,reason", "a.wav,cannot decode"]
    assert "1 clip(s) skipped" in caplog.text
    run.write_test({"accuracy": 0.5}, [("a.wav", "dog", "rain", 0.75), ("b.wav", "rain", "rain", 0.5)])
    assert run.test_predictions.read_text().splitlines()[1:] == ["a.wav,dog,rain,0.7500,0", "b.wav,rain,rain,0.5000,1"]
    assert '"accuracy": 0.5' in run.test_metrics.read_text()
    assert set(run.outputs()) >= {run.best, run.last, run.config, run.labels, run.skipped, run.log}


def test_the_log_is_copied_to_train_log_while_the_run_lasts(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.logging_to_file():
        logging.getLogger("audioclf.train").info("inside")
    logging.getLogger("audioclf.train").info("outside")
    text = run.log.read_text()
    assert "inside" in text and "outside" not in text
