"""After training: the temperature and unknown rule are fitted, saved, and applied by every way of loading."""

import numpy as np
import pytest
import torch

import audioclf
from audioclf.calibrate import calibrate_run
from audioclf.checkpoint import load_checkpoint, save_checkpoint
from audioclf.config import resolve
from audioclf.demo import make_synthetic_dataset, synth_clip
from audioclf.train import fit

pytestmark = pytest.mark.slow

KNOWN = ("tone", "clicks", "warble")  # the classes trained on; "noise" is the unknown


def config(data, **train):
    return resolve(overrides={"features": {"sample_rate": 16000, "duration_s": 1.0},
                              "model": {"backbone": "resnet18", "pretrained": "none"},
                              "data": {"root": str(data), "format": "folder", "val_split": 0.25},
                              "train": {"epochs": 6, "batch_size": 8, "lr": 1e-3, "patience": 0, "quiet": True,
                                        "seed": 3, **train}})


@pytest.fixture(scope="module")
def tones_run(tmp_path_factory):
    data = make_synthetic_dataset(tmp_path_factory.mktemp("known"), n_per_class=16, classes=KNOWN,
                                  duration_s=1.0, seed=0)
    run = tmp_path_factory.mktemp("run") / "run"
    fit(config(data, reject_score="embedding"), run)
    return run


def noise(seed):
    return synth_clip("noise", np.random.default_rng(seed), 16000, 1.0)


def test_training_saves_temperature_and_rule(tones_run):
    ckpt = load_checkpoint(tones_run)
    assert 0.05 <= ckpt["temperature"] <= 20
    r = ckpt["reject"]
    assert r["score"] == "embedding" and r["keep_known"] == 0.95 and len(r["class_means"]) == len(KNOWN)


def test_noise_is_unknown_to_a_model_of_tones(tones_run):
    clf = audioclf.load(tones_run, device="cpu")
    rng = np.random.default_rng(5)
    known = [synth_clip(k, rng, 16000, 1.0) for k in KNOWN for _ in range(4)]
    labels = clf.predict(known + [noise(s) for s in range(6)])
    assert sum(lab == "unknown" for lab in labels[len(known):]) >= 5, labels
    assert sum(lab != "unknown" for lab in labels[:len(known)]) >= 10, labels
    out = clf.classify(noise(0))
    assert out["label"] == "unknown" and out["score"] < out["threshold"]
    assert out["top_k"][0]["label"] in KNOWN  # the nearest known class stays listed
    closed = audioclf.load(tones_run, device="cpu", reject=False)
    assert closed.predict(noise(0)) in KNOWN and "score" not in closed.classify(noise(0))


def test_probabilities_are_divided_by_the_temperature(tones_run, tmp_path):
    ckpt = load_checkpoint(tones_run)
    wave = noise(1)
    calibrated = audioclf.load(tones_run, device="cpu").predict_proba(wave)
    raw = {k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version", "temperature", "reject")}
    save_checkpoint(raw, tmp_path / "old.pt")  # as an older audioclf saved it: no temperature, no rule
    old = audioclf.load(tmp_path / "old.pt", device="cpu")
    assert old.rejector is None and old.temperature == 1.0
    p_old = old.predict_proba(wave)
    want = torch.softmax(torch.log(torch.tensor(p_old, dtype=torch.float64)) / ckpt["temperature"], 0).numpy()
    np.testing.assert_allclose(calibrated, want, atol=1e-4)
    assert old.predict(wave) in KNOWN  # no rule: never unknown


def test_calibrate_run_fits_an_older_run(tones_run, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(tones_run, run)
    ckpt = load_checkpoint(run)
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version", "temperature", "reject")},
                    run / "best.pt")
    keys = calibrate_run(run, device="cpu")
    assert keys["temperature"] == pytest.approx(ckpt["temperature"], rel=1e-4)
    assert load_checkpoint(run)["reject"]["threshold"] == pytest.approx(ckpt["reject"]["threshold"], rel=1e-4)
