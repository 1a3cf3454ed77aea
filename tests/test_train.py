"""Training: learning, early stopping, checkpoints, kill-and-resume, DDP, determinism, bad clips."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from audioclf.checkpoint import load_checkpoint
from audioclf.cli import build_parser, config_from_args
from audioclf.config import AudioclfError, resolve
from audioclf.demo import make_synthetic_dataset
from audioclf import rundir, train
from audioclf.augment import SpecAugment
from audioclf.cv import cross_validate
from audioclf.model import AudioResNet
from audioclf.optim import make_optimizer, param_groups
from audioclf.train import Session, evaluate_split, fit, train_one_epoch

pytestmark = pytest.mark.slow

SMALL = {"features": {"sample_rate": 16000, "duration_s": 1.0}, "model": {"backbone": "resnet18", "pretrained": "none"}}


def small_config(data_dir, **train):
    t = {"epochs": 4, "batch_size": 8, "lr": 1e-3, "scheduler": "cosine", "patience": 0, "quiet": True, "seed": 3}
    t.update(train)
    return resolve(overrides={**SMALL, "data": {"root": str(data_dir), "format": "folder", "val_split": 0.25}, "train": t})


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_short_training_learns_and_writes_the_run(synth_dir, tmp_path):
    summary = fit(small_config(synth_dir, epochs=6), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "labels.json", "metrics.csv", "best.pt", "last.pt", "curves.png", "skipped.csv", "train.log"):
        assert (run / name).is_file(), name
    rows = read_rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert set(rows[0]) >= {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "epoch_s", "clips_per_s"}
    best_acc = max(float(r["val_acc"]) for r in rows)
    assert best_acc >= 0.75, f"3 classes, chance is 0.33; got {best_acc}"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_checkpoint(run)  # a run dir means best.pt
    assert best["epoch"] == summary["best_epoch"]
    assert best["labels"] == json.loads((run / "labels.json").read_text())
    assert best["config"]["model"]["pretrained"] == "none"  # the resolved recipe is what is saved
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 6 and {"optimizer", "scheduler", "bad_epochs"} <= set(last)


def test_early_stopping_stops(tmp_path):
    # Labels that do not depend on the sound: the model can only memorise, so validation loss rises.
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(32):
        d = data / ("a" if rng.random() < 0.5 else "b")
        d.mkdir(parents=True, exist_ok=True)
        sf.write(d / f"x{i}.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
    summary = fit(small_config(data, epochs=30, patience=2, lr=3e-3, scheduler="plateau"), tmp_path / "run")
    assert summary["stopped_early"]
    assert summary["epochs_run"] < 30
    assert summary["epochs_run"] - summary["best_epoch"] == 2
    assert len(read_rows(tmp_path / "run" / "metrics.csv")) == summary["epochs_run"]


def test_two_runs_with_one_seed_are_identical(synth_dir, tmp_path):
    cfg = small_config(synth_dir, epochs=2, seed=11)
    cfg.augment.mixup_alpha = 0.4
    fit(cfg, tmp_path / "a")
    fit(cfg, tmp_path / "b")
    drop = ("epoch_s", "clips_per_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_rows(tmp_path / "a" / "metrics.csv")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_rows(tmp_path / "b" / "metrics.csv")]
    assert a == b


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "audioclf", "train", str(data), "--out", str(out), "--backbone", "resnet18", "--no-pretrained",
            "--sample-rate", "16000", "--duration", "1.0", "--batch-size", "8", "--lr", "1e-3",
            "--scheduler", "cosine", "--patience", "0", "--seed", "5", "--quiet", *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run(synth_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every process: same float sums
    full, killed = tmp_path / "full", tmp_path / "killed"
    cache = ("--cache-dir", str(tmp_path / "cache"))  # cold for the killed run, warm for the uninterrupted one

    proc = subprocess.Popen(_train_cmd(synth_dir, killed, "--epochs", "5", *cache), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if len(read_rows(killed / "metrics.csv")) >= 2 and load_checkpoint(killed / "last.pt")["epoch"] >= 2:
                break
        except (FileNotFoundError, AudioclfError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at_kill = load_checkpoint(killed / "last.pt")["epoch"]
    assert 2 <= at_kill < 5

    r = subprocess.run(_train_cmd(synth_dir, killed, "--epochs", "5", "--resume", *cache), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    subprocess.run(_train_cmd(synth_dir, full, "--epochs", "5", *cache), check=True, env=env, capture_output=True)
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["epoch"] == b["epoch"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    drop = ("epoch_s", "clips_per_s")
    assert [{k: v for k, v in row.items() if k not in drop} for row in read_rows(full / "metrics.csv")] == \
           [{k: v for k, v in row.items() if k not in drop} for row in read_rows(killed / "metrics.csv")]


def test_resume_without_last_checkpoint_is_refused(synth_dir, tmp_path):
    with pytest.raises(AudioclfError, match="last.pt does not exist"):
        fit(small_config(synth_dir), tmp_path / "nothing", resume=True)


def test_two_process_ddp_on_cpu(synth_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "audioclf",
           *_train_cmd(synth_dir, out, "--epochs", "2", "--device", "cpu")[3:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 2
    assert "x2 processes" in (out / "train.log").read_text()
    ckpt = load_checkpoint(out)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the bare model is saved, not the DDP wrapper


def test_corrupt_clip_is_skipped_and_listed(synth_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    bad = data / "tone" / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    fit(small_config(data, epochs=1), tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "skipped.csv")
    assert [r["path"] for r in rows] == [str(bad.resolve())]
    assert "broken.wav" in rows[0]["reason"]
    with pytest.raises(AudioclfError, match="strict"):
        cfg = small_config(data, epochs=1)
        cfg.data.strict = True
        cfg.data.cache_dir = str(tmp_path / "fresh-cache")  # a cache hit would not decode again
        fit(cfg, tmp_path / "strict")


def test_bad_datasets_are_refused_before_training(tmp_path):
    one = make_synthetic_dataset(tmp_path / "one", n_per_class=4, classes=["tone"], duration_s=0.5)
    with pytest.raises(AudioclfError, match="at least 2"):
        fit(small_config(one), tmp_path / "run1")
    two = make_synthetic_dataset(tmp_path / "two", n_per_class=4, classes=["tone", "noise"], duration_s=0.5)
    cfg = small_config(two)
    cfg.data.val_fold = 3
    with pytest.raises(AudioclfError, match="val_fold=3 has no clips"):
        fit(cfg, tmp_path / "run2")


def test_flags_override_yaml_and_preset(tmp_path, synth_dir):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 7\n  lr: 0.01\naugment:\n  time_mask_width: 40\n")
    args = build_parser().parse_args(["train", str(synth_dir), "--out", "x", "--config", str(y), "--lr", "0.002",
                                      "--preset", "tutorial"])
    cfg = config_from_args(args)
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.002 and cfg.augment.time_mask_width == 40
    assert cfg.train.scheduler == "plateau" and cfg.preset == "tutorial"
    y.write_text("train:\n  epoch: 7\n")
    with pytest.raises(AudioclfError, match="unknown config key"):
        config_from_args(build_parser().parse_args(["train", str(synth_dir), "--out", "x", "--config", str(y)]))


def test_cross_validation_on_a_folder_dataset(synth_dir, tmp_path):
    cfg = small_config(synth_dir, epochs=1)
    s = cross_validate(cfg, tmp_path / "cv", folds=[1, 2], n_folds=3)
    assert (tmp_path / "cv" / "folds.csv").is_file()
    assert [f["fold"] for f in s["folds"]] == [1, 2]
    assert 0 <= s["accuracy_mean"] <= 1 and "mean ± std" in s["table"]
    assert (tmp_path / "cv" / "confusion_matrix.png").is_file()
    # Each test fold stayed out of its training and validation clips.
    for k in (1, 2):
        test = {r["path"] for r in read_rows(tmp_path / "cv" / f"fold{k}" / "test_predictions.csv")}
        folds = {r["path"]: int(r["fold"]) for r in read_rows(tmp_path / "cv" / "folds.csv")}
        assert test == {p for p, f in folds.items() if f == k}
    assert sum(map(sum, s["confusion_matrix"])) == sum(f["test_n"] for f in s["folds"])
    # Finished folds are reused (not retrained) by the same recipe, refused by another one.
    mtime = (tmp_path / "cv" / "fold1" / "best.pt").stat().st_mtime_ns
    assert cross_validate(cfg, tmp_path / "cv", folds=[1], n_folds=3)["accuracy_mean"] == s["folds"][0]["test_acc"]
    assert (tmp_path / "cv" / "fold1" / "best.pt").stat().st_mtime_ns == mtime
    other = replace(cfg, train=replace(cfg.train, lr=0.5))
    with pytest.raises(AudioclfError, match=r"different recipe \(train.lr"):
        cross_validate(other, tmp_path / "cv", folds=[1], n_folds=3)


# ------------------------------------------------------------------------------------------ weight decay

class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)  # weight decayed, bias not
        self.bn = torch.nn.BatchNorm2d(4)
        self.ln = torch.nn.LayerNorm((4, 5))  # a 2-D norm weight: spared for its layer, not its shape
        self.gn = torch.nn.GroupNorm(2, 4)
        self.fc = torch.nn.Linear(5, 3)


def test_weight_decay_spares_norm_layers_and_biases():
    m = _Layers()
    decay, no_decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([m.conv.weight, m.fc.weight])
    assert ids(no_decay["params"]) == ids([m.conv.bias, m.bn.weight, m.bn.bias, m.ln.weight, m.ln.bias, m.gn.weight,
                                           m.gn.bias, m.fc.bias])
    # ResNet-18: every parameter in exactly one group, in the model's order
    net = AudioResNet(3, n_mels=32, dropout=0.0, pooling="mean")
    decay, no_decay = param_groups(net, 0.05)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    assert not ids(decay["params"]) & ids(no_decay["params"])
    assert ids(decay["params"]) == {id(p) for name, p in net.named_parameters() if name.endswith("weight") and p.ndim > 1}
    order = {id(p): i for i, p in enumerate(net.parameters())}
    assert [order[id(p)] for p in decay["params"]] == sorted(order[id(p)] for p in decay["params"])


def test_adamw_decays_only_the_decayed_group():
    m = _Layers()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    t = replace(resolve().train, lr=0.1, weight_decay=0.5)
    opt = make_optimizer(m, t, torch.device("cpu"))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay moves a parameter
    opt.step()
    assert torch.allclose(m.conv.weight, torch.full_like(m.conv.weight, 1 - 0.1 * 0.5))
    assert torch.allclose(m.fc.weight, torch.full_like(m.fc.weight, 0.95))
    for p in (m.conv.bias, m.bn.weight, m.bn.bias, m.ln.weight, m.gn.weight, m.fc.bias):
        assert torch.equal(p, torch.ones_like(p))
    assert len(make_optimizer(m, t, torch.device("cpu"), decay_all=True).param_groups) == 1


def test_a_run_started_with_one_optimizer_group_resumes_with_one(synth_dir, tmp_path, monkeypatch):
    # what an audioclf before the parameter groups wrote into last.pt
    monkeypatch.setattr(train, "make_optimizer",
                        lambda model, t, device, decay_all=False: torch.optim.AdamW(model.parameters(), lr=t.lr,
                                                                                    weight_decay=t.weight_decay))
    cfg = small_config(synth_dir, epochs=1)
    fit(cfg, tmp_path / "run")
    assert len(load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]) == 1
    monkeypatch.undo()
    fit(replace(cfg, train=replace(cfg.train, epochs=2)), tmp_path / "run", resume=True)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and len(last["optimizer"]["param_groups"]) == 1
    fit(cfg, tmp_path / "new")  # a new run has both groups
    groups = load_checkpoint(tmp_path / "new" / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [cfg.train.weight_decay, 0.0]


# ------------------------------------------------------------------------------------------ the epoch's pieces

class _Bank:
    """What train_one_epoch and evaluate_split read from a FeatureBank: batches of features and labels,
    here features whose first band's mean tells the class."""

    def __init__(self, n=24, n_mels=16, n_frames=20):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 2
        self.x = torch.randn(n, n_mels, n_frames, generator=g) + 3.0 * self.labels[:, None, None]

    def batch(self, indices, *, random_crop=False, generator=None, multi_hot=False):
        return self.x[indices], self.labels[indices]


def test_train_one_epoch_and_evaluate_split_return_plain_floats():
    torch.manual_seed(0)
    cfg = resolve(overrides={**SMALL, "features": {**SMALL["features"], "n_mels": 16},
                             "train": {"batch_size": 8, "lr": 1e-3, "epochs": 1}})
    model, bank, s = AudioResNet(2, n_mels=16, dropout=0.0, pooling="mean"), _Bank(), Session(rank=0, world=1, device=torch.device("cpu"), amp=None,
                                                                 quiet=True)
    opt = make_optimizer(model, cfg.train, s.device)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    specaug = SpecAugment(cfg.augment, features=cfg.features)
    specaug.set_generator(g)
    out = train_one_epoch(model, bank, torch.randperm(24, generator=g), opt, torch.nn.functional.cross_entropy, s,
                          config=cfg, epoch=1, n_classes=2, specaug=specaug, scaler=torch.amp.GradScaler(enabled=False),
                          generator=g)
    assert set(out) == {"train_loss", "train_acc", "clips_per_s"} and all(type(v) is float for v in out.values())
    assert 0 <= out["train_acc"] <= 1 and out["train_loss"] > 0 and out["clips_per_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it stepped
    val = evaluate_split(model, bank, torch.arange(24), s, batch_size=16)
    assert set(val) == {"val_loss", "val_acc", "val_f1", "val_map"} and all(type(v) is float for v in val.values())
    assert not model.training  # evaluated in eval mode
    logits = model(bank.x)
    assert val["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, bank.labels).item(), rel=1e-5)
    assert val["val_acc"] == pytest.approx((logits.argmax(1) == bank.labels).float().mean().item())


def test_plot_curves_leaves_a_notebooks_matplotlib_alone(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(",".join(rundir.METRIC_FIELDS) + "\n1,0.001,1.2,0.4,1.1,0.5,0.45,3.0,10.0\n"
                       "2,0.0005,0.9,0.6,1.0,0.6,0.55,3.0,10.0\n")
    code = ("import sys, matplotlib; matplotlib.use('svg'); from audioclf.rundir import plot_curves; "
            f"plot_curves({str(metrics)!r}, {str(tmp_path / 'curves.png')!r}); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "False"]  # the notebook's backend, and no pyplot figure manager behind its back
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
