"""AudioSet tags without training: the shipped class names, the pretrained head, the offline message."""

from __future__ import annotations

import csv
import urllib.error
import numpy as np
import pytest
import soundfile as sf

import audioclf
from audioclf.audioset import N_CLASSES, audioset_labels, is_backbone_name
from audioclf.cli import main

from conftest import SHARED_DATA

SHARED_WEIGHTS = SHARED_DATA.parent / "weights" / "mn04_as_mAP_432.pt"
needs_weights = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="needs ../shared/weights/mn04_as_mAP_432.pt")


def test_the_527_audioset_names_ship_with_the_package():
    labels = audioset_labels()
    assert len(labels) == N_CLASSES == len(set(labels))
    assert labels[0] == "Speech" and labels[74] == "Dog" and labels[-1] == "Field recording"
    assert is_backbone_name("mn04_as") and not is_backbone_name("resnet18") and not is_backbone_name("runs/x")


def test_offline_without_weights_the_message_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dest, timeout_s=60.0):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("audioclf.weights._download", offline)
    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    assert main(["tag", str(tmp_path / "a.wav")]) == 2
    err = capsys.readouterr().err
    assert "cannot download the mn04_as weights mn04_as_mAP_432.pt" in err
    assert "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/mn04_as_mAP_432.pt" in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "mn04_as_mAP_432.pt") in err


@pytest.mark.shared_data
@needs_weights
def test_tag_names_a_tone_and_silence_apart(tmp_path, monkeypatch, capsys):
    sr = 32000
    t = np.arange(3 * sr) / sr
    sf.write(tmp_path / "beep.wav", (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), sr)
    assert main(["tag", str(tmp_path / "beep.wav"), "--weights", str(SHARED_WEIGHTS), "--top-k", "3", "--out",
                 str(tmp_path / "tags.csv"), "--quiet"]) == 0
    with open(tmp_path / "tags.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "rank", "label", "prob"] and len(rows) == 4
    tags = [r[2] for r in rows[1:]]
    assert {"Sine wave", "Beep, bleep", "Dial tone"} & set(tags), tags
    assert "beep.wav:" in capsys.readouterr().out


@pytest.mark.shared_data
@needs_weights
def test_load_by_name_gives_the_pretrained_multilabel_tagger(monkeypatch):
    from audioclf.weights import hub_path
    from audioclf.backbones import BACKBONES

    monkeypatch.setattr("audioclf.weights.hub_path", lambda b: SHARED_WEIGHTS if b.name == "mn04_as" else hub_path(b))
    clf = audioclf.load("mn04_as", device="cpu")
    assert len(clf.labels) == N_CLASSES and clf.config.train.task == "multilabel"
    assert clf.config.features.sample_rate == 32000 and BACKBONES["mn04_as"].front_end["n_mels"] == 128
    probs = clf.predict_proba(np.zeros(32000, np.float32))
    assert probs.shape == (N_CLASSES,) and probs.sum() > 1.5  # sigmoids, not a softmax


@pytest.mark.shared_data
@needs_weights
def test_serve_mn04_as_tags_an_upload(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from audioclf.serve import create_app
    from audioclf.weights import hub_path

    monkeypatch.setattr("audioclf.weights.hub_path", lambda b: SHARED_WEIGHTS if b.name == "mn04_as" else hub_path(b))
    sr = 32000
    sf.write(tmp_path / "beep.wav", (0.5 * np.sin(2 * np.pi * 1000 * np.arange(3 * sr) / sr)).astype(np.float32), sr)
    with TestClient(create_app("mn04_as", device="cpu")) as client:
        assert client.get("/health").json()["n_classes"] == N_CLASSES
        r = client.post("/predict", files={"file": ("beep.wav", (tmp_path / "beep.wav").read_bytes())})
        assert r.status_code == 200 and r.json()["label"] == "Beep, bleep"
