"""After training: the temperature and unknown rule are fitted, saved, and applied by every way of loading."""

import json

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


def test_a_knn_rule_keeps_the_training_clips_embeddings(tones_run, tmp_path):
    import shutil

    from audioclf.trust import KNN_K

    run = tmp_path / "knn"
    shutil.copytree(tones_run, run)
    calibrate_run(run, refit=True, score="knn", device="cpu")
    r = load_checkpoint(run)["reject"]
    means = load_checkpoint(tones_run)["reject"]["class_means"]
    assert r["score"] == "knn" and r["k"] == KNN_K and "class_means" not in r
    assert len(r["train_embeddings"]) > len(KNOWN) and len(r["train_embeddings"][0]) == len(means[0])
    clf = audioclf.load(run, device="cpu")
    assert clf.rejector.kind == "knn" and clf.config.train.reject_score == "knn"
    assert sum(lab == "unknown" for lab in clf.predict([noise(s) for s in range(6)])) >= 5
    rng = np.random.default_rng(6)
    assert sum(lab != "unknown" for lab in clf.predict([synth_clip(k, rng, 16000, 1.0) for k in KNOWN])) >= 2


def test_an_energy_mahalanobis_rule_says_unknown_and_survives_the_export(tones_run, tmp_path):
    import shutil

    pytest.importorskip("safetensors")
    from audioclf.export import export

    run = tmp_path / "sum"
    shutil.copytree(tones_run, run)
    calibrate_run(run, refit=True, score="energy+mahalanobis", device="cpu")
    r = load_checkpoint(run)["reject"]
    width = len(load_checkpoint(tones_run)["reject"]["class_means"][0])  # the embedding's
    assert r["score"] == "energy+mahalanobis" and len(r["class_means"]) == len(KNOWN)
    assert len(r["precision"]) == width == len(r["precision"][0]) and len(r["standardize"]) == 2
    clf = audioclf.load(run, device="cpu")
    assert clf.rejector.kind == "energy+mahalanobis" and clf.config.train.reject_score == "energy+mahalanobis"
    rng = np.random.default_rng(7)
    known = [synth_clip(k, rng, 16000, 1.0) for k in KNOWN for _ in range(2)]
    # far off: a pure tone above every trained sound (the tones' harmonics end below 3 kHz). Band noise is not
    # used here: this small model's energy is higher for it than for the known clips, and the sum follows
    far = (0.5 * np.sin(2 * np.pi * 7000 * np.arange(16000) / 16000)).astype(np.float32)
    labels = clf.predict(known + [far])
    assert labels[-1] == "unknown" and sum(lab != "unknown" for lab in labels[:-1]) >= 4, labels
    export(run, "safetensors", tmp_path / "st")
    assert json.loads((tmp_path / "st" / "config.json").read_text())["reject"] == r
    exported = audioclf.load(tmp_path / "st", device="cpu")
    assert exported.predict(known + [far]) == labels
    np.testing.assert_allclose([exported.classify(w)["score"] for w in (far, known[0])],
                               [clf.classify(w)["score"] for w in (far, known[0])], rtol=1e-4, atol=1e-4)


def test_an_older_models_energy_rule_stays_energy(tones_run, tmp_path):
    from audioclf.trust import fit_rejector

    ckpt = load_checkpoint(tones_run)
    ckpt["reject"] = fit_rejector("energy", 0.95, np.zeros((4, len(KNOWN)))).to_dict()
    del ckpt["config"]["train"]["reject_score"]  # saved before the setting, whatever its default is today
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "audioclf_version")}, tmp_path / "old.pt")
    assert audioclf.load(tmp_path / "old.pt", device="cpu").rejector.kind == "energy"


def test_exports_keep_temperature_and_rule(tones_run, tmp_path):
    pytest.importorskip("safetensors")
    from audioclf.export import export

    export(tones_run, "safetensors", tmp_path / "st")
    meta = json.loads((tmp_path / "st" / "config.json").read_text())
    ckpt = load_checkpoint(tones_run)
    assert meta["temperature"] == ckpt["temperature"] and meta["reject"] == ckpt["reject"]
    exported, run = audioclf.load(tmp_path / "st", device="cpu"), audioclf.load(tones_run, device="cpu")
    waves = [noise(0), synth_clip("tone", np.random.default_rng(2), 16000, 1.0)]
    assert exported.predict(waves) == run.predict(waves)
    np.testing.assert_allclose(exported.predict_proba(waves), run.predict_proba(waves), atol=1e-5)


def test_onnx_graph_applies_the_temperature(tones_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort
    from audioclf.export import export

    path = export(tones_run, "onnx", tmp_path / "onnx")
    meta = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert meta["reject"]["score"] == "embedding" and meta["temperature"] == load_checkpoint(tones_run)["temperature"]
    wave = noise(3)[None, :]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if meta["input"] == "waveform":
        got = session.run(None, {"waveform": wave})[0][0]
        np.testing.assert_allclose(got, audioclf.load(tones_run, device="cpu").predict_proba(wave[0]), atol=1e-4)


def test_cli_predict_says_unknown_and_evaluate_writes_ece(tones_run, tmp_path, capsys):
    import soundfile as sf
    from audioclf.cli import main

    sf.write(tmp_path / "noise.wav", noise(0), 16000)
    assert main(["predict", str(tones_run), str(tmp_path / "noise.wav")]) == 0
    assert ",unknown," in capsys.readouterr().out
    assert main(["predict", str(tones_run), str(tmp_path / "noise.wav"), "--no-reject"]) == 0
    assert ",unknown," not in capsys.readouterr().out
    data = load_checkpoint(tones_run)["config"]["data"]["root"]
    assert main(["evaluate", str(tones_run), data, "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_uncalibrated"] <= 1
    assert metrics["temperature"] == load_checkpoint(tones_run)["temperature"]
    assert (tmp_path / "eval" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ECE (15 bins)" in (tmp_path / "eval" / "report.txt").read_text()
