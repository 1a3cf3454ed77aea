"""The dataset audit: clip facts, duplicates, leakage, label errors, the report and the command."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from _models import tiny_run  # noqa: F401 (a fixture)
from conftest import tone

from audioclf.audit import (MATCH_THRESHOLD, NEAR_THRESHOLD, audit_dataset, centred_unit, clip_facts, crosses, exact_pairs,
                            load_probabilities, near_pairs, probe_folds)
from audioclf.cli import main
from audioclf.clips import Clip
from audioclf.commands.audit import check_out_folder, run_audit
from audioclf.config import AudioclfError, DataConfig
from audioclf.predict import load


def test_clip_facts_tell_silent_clipped_and_unreadable_clips(write_wav, tmp_path):
    sine = tone(440, 16000, 1.0, amplitude=0.5)
    ok = clip_facts(str(write_wav(sine, name="ok.wav")))
    assert ok["error"] is None and (ok["sample_rate"], ok["channels"], ok["duration_s"]) == (16000, 1, 1.0)
    assert ok["peak_db"] == pytest.approx(20 * np.log10(0.5), abs=0.01) and ok["clipped"] == 0
    normalised = sine / np.abs(sine).max()  # one sample at full scale: loud, not clipped
    assert clip_facts(str(write_wav(normalised, name="peak.wav", subtype="FLOAT")))["clipped"] == 0
    square = np.clip(sine * 4, -1, 1)  # flat tops at full scale
    assert clip_facts(str(write_wav(square, name="clipped.wav", channels=2)))["clipped"] > 0.5
    assert clip_facts(str(write_wav(np.zeros(16000), name="silent.wav")))["peak_db"] < -100
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    assert "bad.wav" in clip_facts(str(tmp_path / "bad.wav"))["error"]


def test_exact_duplicates_are_the_same_samples_whatever_the_container(write_wav):
    sine = tone(300, 16000, 0.5)
    wav = write_wav(sine, name="a.wav")
    flac = write_wav(sf.read(wav, dtype="float32")[0], name="b.flac")  # converted: the same 16-bit samples
    quieter = write_wav(sine * 0.5, name="c.wav")
    other_rate = write_wav(sine, 8000, name="d.wav")
    hashes = [clip_facts(str(p))["hash"] for p in (wav, flac, quieter, other_rate)]
    assert exact_pairs(hashes + [None, None]) == [(0, 1)]


def test_near_pairs_finds_every_pair_above_the_threshold_across_blocks():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(7, 16))
    emb = np.concatenate([base, base[[1, 5]] + 0.01 * rng.normal(size=(2, 16))])  # rows 7 and 8 copy 1 and 5
    pairs = near_pairs(centred_unit(emb), 0.99, block=3)
    assert [(a, b) for a, b, _ in pairs] in ([(1, 7), (5, 8)], [(5, 8), (1, 7)])
    assert all(s >= 0.99 for *_, s in pairs) and pairs[0][2] >= pairs[1][2]


def test_a_pair_crosses_when_its_folds_differ_or_without_folds_its_groups():
    assert crosses(Clip("a", 0, 1, "g"), Clip("b", 0, 2, "g"))
    assert not crosses(Clip("a", 0, 1, "g"), Clip("b", 0, 1, "h"))
    assert crosses(Clip("a", 0, None, "g"), Clip("b", 0, None, "h"))
    assert not crosses(Clip("a", 0, None, "g"), Clip("b", 1, None, "g"))


def test_probe_folds_are_the_datasets_or_group_folds():
    with_folds = [Clip(f"{i}", i % 2, i % 3 + 1) for i in range(12)]
    assert probe_folds(with_folds).tolist() == [c.fold for c in with_folds]
    grouped = [Clip(f"{i}", i % 2, None, f"g{i // 2}") for i in range(24)]
    folds = probe_folds(grouped)
    for g in {c.group for c in grouped}:  # a recording never straddles two folds
        assert len({k for c, k in zip(grouped, folds) if c.group == g}) == 1
    assert len(set(folds)) >= 2


@pytest.fixture
def planted(tiny_run, tmp_path):
    """A CSV dataset of the tiny model's clips in 3 folds, with an exact copy in another fold, a gain-changed
    copy, a flipped label, a silent clip, a clipped clip and an unreadable file."""
    root = tmp_path / "data"
    rows = []
    for k, path in enumerate(sorted(tiny_run.data_dir.rglob("*.wav"))):
        dest = root / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
        rows.append([f"{path.parent.name}/{path.name}", path.parent.name, k % 3 + 1])
    source = rows[0]  # chirp/chirp_000.wav, fold 1
    shutil.copy(root / source[0], root / "copy.wav")
    wave, sr = sf.read(root / rows[4][0])
    sf.write(root / "quieter.wav", wave * 0.3, sr)
    sf.write(root / "silent.wav", np.zeros(sr), sr)
    sf.write(root / "clipped.wav", np.clip(wave * 50, -1, 1), sr)
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt broken")
    flipped = rows[30]
    assert flipped[1] != "noise"
    rows[30] = [flipped[0], "noise", flipped[2]]
    rows += [["copy.wav", source[1], 2], ["quieter.wav", rows[4][1], 3], ["silent.wav", "tone", 1],
             ["clipped.wav", rows[4][1], 2], ["broken.wav", "tone", 3]]
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "fold"], *rows])
    return {"data": DataConfig(root=str(root / "manifest.csv"), format="csv"), "source": source[0],
            "flipped": flipped, "quieter": rows[4][0], "embedder": load(tiny_run.run_dir, "cpu")}


def test_audit_finds_what_was_planted_and_reports_manifest_paths(planted, tmp_path):
    out = tmp_path / "report"
    r = run_audit(planted["data"], out=out, embedder=planted["embedder"], device="cpu", quiet=True)
    report = json.loads((out / "audit.json").read_text())
    assert report == r["report"]
    assert {"audit.md", "durations.png", "sample_rates.png", "channels.png", "counts.png", "oof_probs.csv"} <= \
        {p.name for p in out.iterdir()}
    assert [u["path"] for u in report["unreadable"]] == ["broken.wav"]
    assert [s["path"] for s in report["silent"]] == ["silent.wav"]
    assert [c["path"] for c in report["clipped"]] == ["clipped.wav"]
    exact = [d for d in report["duplicates"] if d["kind"] == "exact"]
    assert [(d["a"], d["b"], d["cross_fold"]) for d in exact] == [(planted["source"], "copy.wav", True)]
    near = {frozenset((d["a"], d["b"])) for d in report["duplicates"] if d["kind"] == "near"}
    assert frozenset((planted["quieter"], "quieter.wav")) in near  # peak normalisation: the same features
    assert all(d["similarity"] >= NEAR_THRESHOLD and d["match"] >= MATCH_THRESHOLD for d in report["duplicates"])
    issues = report["label_issues"]
    # the flipped clip, with its true class suggested; beside it only the clip clipped until it sounds like noise
    (flipped,) = [i for i in issues if i["path"] == planted["flipped"][0]]
    assert (flipped["given"], flipped["suggested"]) == ("noise", planted["flipped"][1])
    assert flipped in issues[:2] and {i["path"] for i in issues} <= {planted["flipped"][0], "clipped.wav"}
    assert [i["score"] for i in issues] == sorted(i["score"] for i in issues)  # most likely first
    c = report["counts"]
    assert (c["clips"], c["unreadable"], c["silent"], c["clipped"], c["label_issues"]) == (41, 1, 1, 1, len(issues))
    assert c["per_class_fold"]["tone"] == {"1": 4, "2": 4, "3": 5}  # 12, one flipped away, silent and broken in
    assert r["summary"][0].startswith("41 clips, 3 classes")
    md = (out / "audit.md").read_text()
    assert "copy.wav" in md and "![clips per class and fold](counts.png)" in md

    # the probabilities it wrote give the same label issues when passed back
    again = audit_dataset(planted["data"], embedder=planted["embedder"], probs=out / "oof_probs.csv", quiet=True)
    assert [again["paths"][i] for i, _, _ in again["issues"]] == [i["path"] for i in issues]


def test_probabilities_from_a_cv_folder_come_from_each_folds_model(planted, tiny_run, tmp_path):
    cv = tmp_path / "cv"
    for k in (1, 2, 3):
        (cv / f"fold{k}").mkdir(parents=True)
        shutil.copy(tiny_run.run_dir / "best.pt", cv / f"fold{k}" / "best.pt")
    result = audit_dataset(planted["data"], embedder=planted["embedder"], probs=cv, device="cpu", quiet=True)
    probs, paths = result["probs"], result["paths"]
    readable = [i for i, p in enumerate(paths) if p != "broken.wav"]
    assert np.isfinite(probs[readable]).all() and np.allclose(probs[readable].sum(axis=1), 1, atol=1e-4)
    i = paths.index(planted["source"])
    expected = planted["embedder"].predict_proba(result["clipset"].clips[i].path)
    assert np.allclose(probs[i], expected, atol=1e-5)  # the dataset's classes are the model's, same order
    assert result["settings"]["probs"] == str(cv)
    with pytest.raises(AudioclfError, match="no fold<k>/best.pt"):
        load_probabilities(tmp_path, result["clipset"].clips, result["clipset"].classes, planted["data"])


def test_a_probs_csv_without_the_class_columns_is_refused(planted, tmp_path):
    (tmp_path / "p.csv").write_text("path,chirp\nx.wav,1\n")
    with pytest.raises(AudioclfError, match="missing column.*noise"):
        audit_dataset(planted["data"], embedder=planted["embedder"], probs=tmp_path / "p.csv", quiet=True)


def test_the_out_folder_is_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AudioclfError, match="is a file"):
        check_out_folder(tmp_path / "file")
    check_out_folder(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
    # a dataset that does not exist is not read either: the out folder comes first
    assert main(["audit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_without_the_backbones_weights_the_audit_says_what_it_did_not_check(planted, tmp_path):
    with pytest.raises(AudioclfError, match="backbone='resnet18'; choose one of 'mn04_as'"):
        audit_dataset(planted["data"], backbone="resnet18")
    # offline, nothing cached: the rest of the audit, and the reason the rest is missing
    r = run_audit(planted["data"], out=tmp_path / "r", quiet=True)
    c, settings = r["report"]["counts"], r["report"]["settings"]
    assert (c["exact_duplicates"], c["silent"], c["near_duplicates"], c["label_issues"]) == (1, 1, 0, 0)
    assert "mn04_as_mAP_432.pt" in settings["embeddings"] and "mn04_as_mAP_432.pt" in settings["probs"]
    assert "near ones NOT CHECKED" in r["summary"][2]


def test_without_cleanlab_the_error_names_the_extra(monkeypatch):
    import sys

    from audioclf.audit import label_issues

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab.filter now fails
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(AudioclfError, match=r'pip install "audioclf\[audit\]"'):
        label_issues(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))


def test_the_embedder_gives_the_trunk_then_the_audioset_logits_in_one_pass():
    import torch

    from audioclf.audit import EmbedAndTag
    from audioclf.model import AudioMobileNet

    net = AudioMobileNet(527, 0.4, dropout=0.2, pooling="mean").eval()
    x = torch.randn(2, 128, 100)
    both = EmbedAndTag(net).eval().embed(x)
    n = EmbedAndTag(net).n_trunk
    assert both.shape == (2, n + 527)
    assert torch.allclose(both[:, :n], net.embed(x), atol=1e-5) and torch.allclose(both[:, n:], net(x), atol=1e-5)
