"""Hostile training (issue 12, sections 1-3 and 5): the same seed gives the same model whatever ran before,
a diverging run stops loudly, --resume continues the run it names or refuses, one macro-F1, and a run
directory is never shared, silently replaced or made where it cannot be."""

import csv
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import yaml

from audioclf import demo
from audioclf.checkpoint import load_checkpoint
from audioclf.cli import main
from audioclf.config import AudioclfError, resolve
from audioclf.demo import make_synthetic_dataset
from audioclf.cv import cross_validate
from audioclf.rundir import LOCK_FILE
from audioclf.store import FeatureBank
from audioclf.train import fit

pytestmark = pytest.mark.slow

# small enough that an epoch over conftest's 36 clips takes about a second on 2 cores
TINY = {"features": {"sample_rate": 16000, "duration_s": 1.0, "n_mels": 32, "n_fft": 512, "hop_length": 512,
                     "win_length": 512},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "scheduler": "cosine", "warmup_epochs": 0, "patience": 0,
                  "quiet": True, "seed": 3}}
DROP = ("epoch_s", "clips_per_s")  # timing columns


def tiny_config(data_dir, fmt="folder", **train):
    return resolve(overrides={**TINY, "data": {"root": str(data_dir), "format": fmt, "val_split": 0.25},
                              "train": {**TINY["train"], **train}})


def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in DROP} for r in csv.DictReader(f)]


def same_weights(a, b):
    a, b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ reproducibility

def test_a_cold_and_a_warm_feature_cache_train_the_same_model(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, epochs=2)
    cfg = replace(cfg, data=replace(cfg.data, cache_dir=str(tmp_path / "cache"), num_workers=1))
    fit(cfg, tmp_path / "cold")  # builds the cache
    fit(cfg, tmp_path / "warm")  # reads it
    assert same_weights(tmp_path / "cold", tmp_path / "warm")
    assert rows(tmp_path / "cold" / "metrics.csv") == rows(tmp_path / "warm" / "metrics.csv")
    # on CPU, deterministic kernels change nothing: the same model, and the process is left as it was
    fit(replace(cfg, train=replace(cfg.train, deterministic=True)), tmp_path / "deterministic")
    assert same_weights(tmp_path / "cold", tmp_path / "deterministic")
    assert not torch.are_deterministic_algorithms_enabled()


# ------------------------------------------------------------------------------------------ diverging runs

def test_a_nan_loss_stops_the_run_with_a_message(synth_dir, tmp_path, monkeypatch, capsys):
    batch = FeatureBank.batch

    def poisoned(self, indices, **kw):  # what a damaged cache or a diverged model feeds the loss
        x, y = batch(self, indices, **kw)
        if kw.get("random_crop"):
            x[0, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(FeatureBank, "batch", poisoned)
    run = tmp_path / "run"
    assert main(["train", str(synth_dir), "--out", str(run), "--config", str(tiny_yaml(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "training loss is nan at epoch 1, batch 1" in err and "Lower the learning rate (lr=0.001)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (run / "best.pt").exists()


# ------------------------------------------------------------------------------------------ --resume

def test_resume_takes_only_the_safe_flags_and_refuses_other_data(synth_dir, tmp_path, capsys, caplog):
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synth_dir, data)
    base = ["train", str(data), "--out", str(run), "--config", str(tiny_yaml(tmp_path))]
    assert main(base) == 0
    capsys.readouterr()

    for extra, text in [(["--lr", "0.5"], "train.lr: 0.001 there, 0.5 now"),
                        (["--mixup", "0.2"], "augment.mixup_alpha: 0.0 there, 0.2 now"),
                        (["--preset", "tutorial"], "preset: 'default' there, 'tutorial' now"),
                        (["--overwrite"], "give one of them")]:
        assert main([*base, "--resume", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", str(synth_dir), *base[2:], "--resume"]) == 2  # the data argument is not ignored
    assert "data.root" in capsys.readouterr().err

    # the data gained a class: refused before anything in the run directory is rewritten
    make_synthetic_dataset(data, n_per_class=3, classes=["warble"], duration_s=1.0)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "train.log"}
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "now has the classes chirp, noise, tone, warble" in err and "trained on chirp, noise, tone" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "train.log"} == before

    shutil.rmtree(data / "warble")
    caplog.set_level(logging.INFO, logger="audioclf")
    assert main([*base, "--resume", "--epochs", "2", "--num-workers", "0", "--device", "cpu"]) == 0
    assert "resume: train.epochs=2 (was 1)" in caplog.text and "resume: data.num_workers=0 (was None)" in caplog.text
    assert [int(r["epoch"]) for r in rows(run / "metrics.csv")] == [1, 2]
    assert load_checkpoint(run / "last.pt")["config"]["train"]["epochs"] == 2


# ------------------------------------------------------------------------------------------ macro-F1

def test_train_and_evaluate_report_one_macro_f1(synth_dir, tmp_path):
    # fold 1 (the test fold) holds no "tone" clip: the two definitions of old disagreed exactly there
    manifest = tmp_path / "clips.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        for i, p in enumerate(sorted(synth_dir.glob("*/*.wav"))):
            fold = 1 if p.parent.name != "tone" and i % 3 == 0 else 2 + i % 2
            w.writerow([str(p), p.parent.name, fold])
    cfg = tiny_config(manifest, "csv", epochs=3, amp=False)
    cfg = replace(cfg, data=replace(cfg.data, test_fold=1))
    fit(cfg, tmp_path / "run")
    assert main(["evaluate", str(tmp_path / "run"), str(manifest), "--fold", "1", "--device", "cpu", "--quiet"]) == 0
    trained = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    evaluated = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    same = ("path", "true", "predicted", "correct")  # the confidence comes from the cache on one side, the audio on the other
    with open(tmp_path / "run" / "test_predictions.csv") as f, open(tmp_path / "run" / "eval" / "predictions.csv") as g:
        assert [[r[k] for k in same] for r in csv.DictReader(f)] == [[r[k] for k in same] for r in csv.DictReader(g)]
    # the same predictions, so the same report: every figure, per-class table and confusion matrix alike, over
    # the classes present (the test fold's report used to list "tone" and a zero row for it; evaluate does not)
    del evaluated["skipped"], evaluated["out_dir"]
    # evaluate sees calibrated probabilities only and undoes the temperature from them: equal up to rounding
    assert evaluated.pop("ece_uncalibrated") == pytest.approx(trained.pop("ece_uncalibrated"), abs=1e-6)
    assert trained == evaluated
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["test_acc"], summary["test_f1"], summary["test_n"]) == \
           (evaluated["accuracy"], evaluated["macro_f1"], evaluated["n_clips"])


# ------------------------------------------------------------------------------------------ the run directory

def test_a_second_training_into_a_run_directory_in_use_is_refused(synth_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_yaml(tmp_path)
    cmd = [sys.executable, "-m", "audioclf", "train", str(synth_dir), "--out", str(run), "--config", str(cfg),
           "--epochs", "1000"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "last.pt").is_file():
            time.sleep(0.05)
        assert (run / LOCK_FILE).read_text().strip() == str(first.pid)
        assert main(["train", str(synth_dir), "--out", str(run), "--config", str(cfg)]) == 2
        assert f"in use by another training (pid {first.pid})" in capsys.readouterr().err
        assert main(["train", str(synth_dir), "--out", str(run), "--config", str(cfg), "--resume"]) == 2
        assert f"(pid {first.pid})" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    # killed, it left its lock file but no lock: the next run goes ahead
    assert (run / LOCK_FILE).exists()
    assert main(["train", str(synth_dir), "--out", str(run), "--config", str(cfg), "--overwrite"]) == 0
    assert not (run / LOCK_FILE).exists()


def test_an_earlier_run_is_kept_unless_overwrite(synth_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(synth_dir)
    fit(cfg, run)
    # what an earlier run and the user left there
    (run / "test_metrics.json").write_text("{}")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    best = (run / "best.pt").read_bytes()
    with pytest.raises(AudioclfError, match=r"holds an earlier run \(best.pt, last.pt, metrics.csv, summary.json, test_metrics.json\)"
                                            r".*--resume.*--overwrite"):
        fit(cfg, run)
    assert (run / "best.pt").read_bytes() == best
    fit(replace(cfg, train=replace(cfg.train, seed=4)), run, overwrite=True)
    assert (run / "best.pt").read_bytes() != best
    assert not (run / "test_metrics.json").exists() and not (run / "eval").exists()  # no stale results of the old model
    assert (run / "notes.txt").read_text() == "mine"  # never a user's file


def test_an_out_that_cannot_be_a_run_directory_is_refused_before_any_work(synth_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, text in [(a_file, "is a file"), (a_file / "run", "lies under"),
                      ("/proc/self/audioclf-run", "is not writable")]:
        assert main(["train", str(synth_dir), "--out", str(out), "--config", str(tiny_yaml(tmp_path))]) == 2
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
        assert main(["cv", str(synth_dir), "--out", str(out)]) == 2
        assert text in capsys.readouterr().err


def test_cv_trains_an_unfinished_fold_again_and_reuses_finished_ones(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir)
    first = cross_validate(cfg, tmp_path / "cv", folds=[1], n_folds=3)
    (tmp_path / "cv" / "fold1" / "summary.json").unlink()  # as if killed before the fold finished
    again = cross_validate(cfg, tmp_path / "cv", folds=[1], n_folds=3)
    assert again["folds"][0]["test_acc"] == first["folds"][0]["test_acc"]  # the same seed: the same fold
    mtime = (tmp_path / "cv" / "fold1" / "best.pt").stat().st_mtime_ns
    cross_validate(cfg, tmp_path / "cv", folds=[1], n_folds=3)
    assert (tmp_path / "cv" / "fold1" / "best.pt").stat().st_mtime_ns == mtime


def test_the_demo_can_be_run_again(tmp_path, monkeypatch):
    def one_epoch(data_dir, quiet=False, weights_path=None):
        return resolve(overrides={**TINY, "data": {"root": str(data_dir), "format": "folder", "val_split": 0.25}})

    def fewer_clips(root, n_per_class=24, **kw):
        return make_synthetic_dataset(root, n_per_class=n_per_class // 4, **kw)

    monkeypatch.setattr(demo, "demo_config", one_epoch)
    monkeypatch.setattr(demo, "make_synthetic_dataset", fewer_clips)
    for _ in range(2):
        result = demo.run_demo(tmp_path, quiet=True)
        assert result["eval"]["n_clips"] == 10  # 2 test clips of each of the 5 classes


# ---------------------------------------------------------------------------------------------- issue 21

def _folder(root, per_class: dict):
    import soundfile as sf

    from conftest import tone

    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            sf.write(root / name / f"{k}.wav", tone(200.0 + 100 * k, 8000, 0.2), 8000)
    return root


@pytest.mark.parametrize("command", ["train", "cv"])
def test_too_few_clips_for_the_split_says_how_many_each_class_has(tmp_path, capsys, command):
    data = _folder(tmp_path / "data", {"cat": 4, "dog": 4, "owl": 4})
    from audioclf.cli import main

    assert main([command, str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--pretrained", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "clips per class: cat: 4, dog: 4, owl: 4" in err and "a class needs at least 5 clips" in err, err


def test_too_few_clips_in_some_classes_is_our_warning_not_sklearns(tmp_path, caplog):
    import warnings

    from audioclf.data import read_folder, split_clips

    clipset = read_folder(_folder(tmp_path / "data", {"cat": 10, "dog": 3}))
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        split_clips(clipset.clips, val_split=0.2, classes=clipset.classes)
    assert not [w for w in raised if "sklearn" in w.filename], [str(w.message) for w in raised]
    assert "class(es) dog (3) have fewer than 5 clips" in caplog.text


def test_poor_messages_hidden_class_folder_is_named_in_a_warning(tmp_path, caplog):
    from audioclf.data import read_folder

    data = _folder(tmp_path / "data", {"cat": 2, "dog": 2, ".owl": 2})
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref")
    assert read_folder(data).classes == ["cat", "dog"]
    assert ".owl hold audio but are hidden" in caplog.text and ".git" not in caplog.text
