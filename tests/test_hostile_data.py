"""Hostile datasets (issue 12): manifests that list one file twice, odd encodings, odd names, links that lead
nowhere, unreadable files, a tampered feature cache, a bad cache folder, a 10-minute clip among short ones."""

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

import audioclf.audio as audio_module
import audioclf.shards as shards_module
import audioclf.store as store_module
from audioclf.audio import load_audio
from audioclf.config import AudioclfError, FeatureConfig
from audioclf.data import Clip, read_csv, read_folder, split_clips
from audioclf.features import LogMel
from audioclf.store import FeatureBank, check_cache_dir
from conftest import tone

SR = 8000  # Hz: small files, fast builds
FEATURES = FeatureConfig(sample_rate=SR, duration_s=0.5)


def wav(path, freq=440.0, duration_s=0.3, seed=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = tone(freq, SR, duration_s)
    if seed is not None:
        wave = wave + 0.05 * np.random.default_rng(seed).standard_normal(wave.size).astype(np.float32)
    sf.write(os.fsencode(path), wave, SR)  # bytes: soundfile encodes a str name strictly
    return path


def manifest(path, rows, header=("path", "label", "fold")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def build(clipset, cache_dir, features=FEATURES, **kw):
    kw.setdefault("num_workers", 0)
    return FeatureBank.build(clipset, features, cache_dir=cache_dir, quiet=True, **kw)


def two_class_folder(root, per_class=3):
    for name, freq in (("high", 1500.0), ("low", 300.0)):
        for k in range(per_class):
            wav(root / name / f"{name}{k}.wav", freq, seed=k)
    return root


# ------------------------------------------------------------------------------------------ CSV manifests

def test_one_file_in_two_folds_is_refused_naming_both_rows(tmp_path):
    wav(tmp_path / "a.wav")
    wav(tmp_path / "b.wav")
    m = manifest(tmp_path / "m.csv", [["a.wav", "dog", 1], ["b.wav", "cat", 1], ["./a.wav", "dog", 2]])
    with pytest.raises(AudioclfError, match=r"m.csv: 1 audio file\(s\) listed more than once .*/a.wav is on lines "
                                            r"2, 4 with folds 1, 2.*tested on what it was trained on"):
        read_csv(m)


def test_one_file_with_two_labels_is_refused(tmp_path):
    wav(tmp_path / "a.wav")
    m = manifest(tmp_path / "m.csv", [["a.wav", "dog", ""], ["a.wav", "cat", ""]], )
    with pytest.raises(AudioclfError, match=r"a.wav is on lines 2, 3 with labels 'dog', 'cat'"):
        read_csv(m)


def test_an_empty_label_is_refused_naming_the_line(tmp_path):
    wav(tmp_path / "a.wav")
    wav(tmp_path / "b.wav")
    m = manifest(tmp_path / "m.csv", [["a.wav", "dog", ""], ["b.wav", " ", ""]])
    with pytest.raises(AudioclfError, match=r"m.csv line 3: the label of .*b.wav is empty"):
        read_csv(m)


def test_duplicate_rows_are_kept_once_with_a_warning(tmp_path, caplog):
    wav(tmp_path / "a.wav")
    wav(tmp_path / "b.wav")
    m = manifest(tmp_path / "m.csv", [["a.wav", "dog", 1], ["b.wav", "cat", 1], ["a.wav", "dog", 1],
                                      [str(tmp_path / "sub" / ".." / "a.wav"), "dog", 1]])
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        cs = read_csv(m)
    assert sorted(c.path for c in cs.clips) == [str((tmp_path / n).resolve()) for n in ("a.wav", "b.wav")]
    assert "2 duplicate row(s), each kept once" in caplog.text and "line 4 repeats line 2" in caplog.text


def test_a_header_only_csv_says_it_has_no_rows(tmp_path):
    with pytest.raises(AudioclfError, match="m.csv: the CSV has a header but no rows"):
        read_csv(manifest(tmp_path / "m.csv", []))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(AudioclfError, match="empty.csv: the CSV is empty"):
        read_csv(tmp_path / "empty.csv")


def test_a_latin1_csv_is_refused_naming_the_encoding(tmp_path):
    wav(tmp_path / "a.wav")
    (tmp_path / "latin.csv").write_bytes("path,label\na.wav,café\n".encode("latin-1"))
    with pytest.raises(AudioclfError, match=r"latin.csv: not UTF-8 text \(it holds the byte 0xe9.*save the CSV as UTF-8"):
        read_csv(tmp_path / "latin.csv")
    (tmp_path / "bom.csv").write_bytes("path,label\na.wav,café\n".encode("utf-8-sig"))  # what Excel writes
    assert read_csv(tmp_path / "bom.csv").classes == ["café"]


# ------------------------------------------------------------------------------------------------ splits

def test_a_class_with_one_clip_is_trained_on_and_named_in_a_warning(caplog):
    clips = [Clip(f"/d/{k}.wav", k % 2) for k in range(20)] + [Clip("/d/solo.wav", 2)]
    for seed in range(6):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="audioclf"):
            s = split_clips(clips, val_split=0.25, seed=seed, classes=["a", "b", "solo"])
        assert Clip("/d/solo.wav", 2) in s["train"]  # in validation the model could never have learnt it
        assert "'solo' (1 training clip(s)) have no validation clips" in caplog.text
        assert "'a'" not in caplog.text


# ------------------------------------------------------------------------------------- the feature cache

def same_features(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(a.clip_frames(i), b.clip_frames(i)) for i in range(len(a)))


def test_a_cache_changed_on_disk_is_rebuilt_not_trusted(tmp_path, caplog):
    cs = read_folder(two_class_folder(tmp_path / "data"))
    first = build(cs, tmp_path / "cache")
    (shard,) = (tmp_path / "cache").glob("features-*/shard-*.npy")
    # Overwrite a few samples of the stored frames in place, as a disk error or an edit would.
    with open(shard, "r+b") as f:
        f.seek(128 + 64)  # past the .npy header
        f.write(np.full(8, np.nan, dtype=np.float32).tobytes())
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        again = build(cs, tmp_path / "cache")
    assert f"{shard} cannot be used (its checksum does not match" in caplog.text and "rebuilding" in caplog.text
    assert same_features(again, first)
    assert np.isfinite(np.load(shard)).all()  # and the rebuilt copy is sound


def test_a_cache_with_non_finite_features_is_rebuilt(tmp_path, caplog):
    import hashlib

    cs = read_folder(two_class_folder(tmp_path / "data"))
    first = build(cs, tmp_path / "cache")
    (shard,) = (tmp_path / "cache").glob("features-*/shard-*.npy")
    frames = np.load(shard)
    frames[3] = np.inf
    np.save(shard, frames)
    index = json.loads(shard.with_suffix(".json").read_text())
    index["sha256"] = shards_module._digest(hashlib.sha256(frames.tobytes()).hexdigest(), index)  # a consistent shard
    shard.with_suffix(".json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        again = build(cs, tmp_path / "cache")
    assert "NaN or infinite" in caplog.text and "checksum" not in caplog.text
    assert same_features(again, first)


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = store_module.load_audio
    monkeypatch.setattr(store_module, "load_audio", lambda path, sr: (calls.append(path), real(path, sr))[1])
    return calls


def test_a_cache_dir_that_is_a_file_fails_before_any_feature_is_computed(tmp_path, count_decodes):
    cs = read_folder(two_class_folder(tmp_path / "data"))
    a_file = tmp_path / "cachefile"
    a_file.write_text("x")
    with pytest.raises(AudioclfError, match=f"cache_dir {a_file}: is a file, not a folder"):
        build(cs, a_file)
    with pytest.raises(AudioclfError, match=f"cache_dir {a_file / 'sub'}: lies under a file"):
        build(cs, a_file / "sub")
    assert count_decodes == []
    assert check_cache_dir(tmp_path / "new" / "cache").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_a_cache_dir_that_is_not_writable_fails_before_any_feature_is_computed(tmp_path, count_decodes):
    cs = read_folder(two_class_folder(tmp_path / "data"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(AudioclfError, match=f"cache_dir {locked}: cannot write the feature cache there"):
            build(cs, locked)
    finally:
        locked.chmod(0o700)
    assert count_decodes == []


def test_a_cache_dir_refusing_writes_is_named_where_tests_run_as_root(tmp_path, monkeypatch, count_decodes):
    def refuse(**kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", refuse)  # how check_cache_dir tries the folder
    with pytest.raises(AudioclfError, match=r"cache_dir .*cache: cannot write the feature cache there \(Permission denied\)"):
        build(read_folder(two_class_folder(tmp_path / "data")), tmp_path / "cache")
    assert count_decodes == []


def test_temp_files_of_killed_builds_are_removed(tmp_path):
    cs = read_folder(two_class_folder(tmp_path / "data"))
    cache = tmp_path / "cache"
    build(cs, cache)
    (store,) = cache.glob("features-*")
    (store / "shard-00000.json").unlink()  # as if killed while writing the shard
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = store / f".shard-00000.npy.tmp{gone.pid}"
    running = store / f".shard-00001.npy.tmp{os.getpid()}"  # a live build, writing another shard
    for p in (orphan, running):
        p.write_bytes(b"half a shard")
    build(cs, cache)
    assert not orphan.exists() and running.exists()


def test_the_cache_build_leaves_the_global_rng_alone(tmp_path):
    cs = read_folder(two_class_folder(tmp_path / "data"))
    for workers in (0, 1):
        torch.manual_seed(3)
        state = torch.random.get_rng_state()
        build(cs, tmp_path / f"cache{workers}", num_workers=workers)
        assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------------- odd names, links, permissions

BAD = os.fsdecode(b"caf\xff")  # not valid UTF-8: Python surrogate-escapes it


def test_file_names_that_are_not_utf8_are_trained_on(tmp_path):
    root = two_class_folder(tmp_path / "data")
    wav(root / "high" / f"{BAD}a.wav", 700.0)
    wav(root / "high" / f"{BAD}b.wav", 800.0)
    wav(root / "low" / f"{BAD}.wav", 300.0)
    cs = read_folder(root)
    bank = build(cs, tmp_path / "cache")
    assert bank.skipped == [] and len(bank) == len(cs.clips) == 9
    assert os.path.join(root, "low", f"{BAD}.wav") in {c.path for c in bank.clips}
    (root / "high" / f"{BAD}b.wav").write_bytes(b"RIFF not audio")  # a bad file with a bad name: reported, not fatal
    bank = build(read_folder(root), tmp_path / "cache")
    assert [p for p, _ in bank.skipped] == [os.path.join(root, "high", f"{BAD}b.wav")]


def test_links_that_lead_nowhere_are_listed_as_skipped(tmp_path):
    root = two_class_folder(tmp_path / "data")
    (root / "low" / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (root / "low" / "loop.wav").symlink_to(root / "low" / "loop.wav")
    (root / "high" / "link.wav").symlink_to(root / "high" / "high0.wav")  # a sound link is a clip
    cs = read_folder(root)
    reasons = {os.path.basename(p): why for p, why in cs.skipped}
    assert reasons.keys() == {"dangling.wav", "loop.wav"}
    assert reasons["dangling.wav"].startswith("broken symlink") and str(tmp_path / "gone.wav") in reasons["dangling.wav"]
    assert reasons["loop.wav"].startswith("symlink loop")
    bank = build(cs, tmp_path / "cache")
    assert {os.path.basename(p) for p, _ in bank.skipped} == {"dangling.wav", "loop.wav"}
    with pytest.raises(AudioclfError, match="dangling.wav: broken symlink"):
        load_audio(root / "low" / "dangling.wav", SR)
    with pytest.raises(AudioclfError, match="loop.wav: symlink loop"):
        load_audio(root / "low" / "loop.wav", SR)
    m = manifest(tmp_path / "m.csv", [["data/low/dangling.wav", "low", ""], ["data/low/low0.wav", "low", ""]])
    assert [why.split(" (")[0] for _, why in read_csv(m).skipped] == ["broken symlink"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_reported_as_permission_denied(tmp_path):
    root = two_class_folder(tmp_path / "data")
    locked = root / "low" / "low0.wav"
    locked.chmod(0)
    try:
        with pytest.raises(AudioclfError, match="low0.wav: permission denied"):
            load_audio(locked, SR)
        bank = build(read_folder(root), tmp_path / "cache")
        assert [(p, "permission denied" in why) for p, why in bank.skipped] == [(str(locked), True)]
    finally:
        locked.chmod(0o644)


def test_permission_denied_is_told_apart_from_undecodable(tmp_path, monkeypatch):
    """The same check as above where the tests run as root: access is what the OS says it is."""
    locked = wav(tmp_path / "locked.wav")
    monkeypatch.setattr(audio_module.os, "access", lambda path, mode: os.fspath(path) != str(locked))
    with pytest.raises(AudioclfError, match="locked.wav: permission denied") as e:
        load_audio(locked, SR)
    assert "cannot decode" not in str(e.value)


# ------------------------------------------------------------------------------------------ long clips

def test_training_features_of_a_long_clip_are_what_prediction_computes(tmp_path):
    """Peak normalisation per inference window in both paths: the cache holds, for each clip, the features
    prediction computes for the same samples (a quiet stretch of a long clip is not scaled by a loud one)."""
    from audioclf.predict import prepare

    root = two_class_folder(tmp_path / "data")
    loud_then_quiet = np.concatenate([0.9 * tone(250.0, SR, 2.0), 0.01 * tone(250.0, SR, 5.3)])
    long = root / "low" / "long.wav"
    sf.write(long, loud_then_quiet, SR, subtype="FLOAT")
    cs = read_folder(root)
    bank = build(cs, tmp_path / "cache", batch_size=2)
    logmel = LogMel(FEATURES)
    for i, c in enumerate(bank.clips):
        source = prepare(c.path, None, FEATURES, FEATURES.n_samples, FEATURES.n_samples // 2)
        want = torch.cat([logmel(torch.from_numpy(np.asarray(w))) for _, w in source.windows], dim=1)
        got = bank.clip_frames(i)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if c.path == str(long):
            assert got.shape[1] == 29 * FEATURES.n_frames  # 7.3 s in 0.5-s windows every 0.25 s, the last end-aligned
            x, _ = bank.batch(torch.tensor([i]))  # validation: the middle window
            assert torch.equal(x[0], got[:, 14 * FEATURES.n_frames: 15 * FEATURES.n_frames])
            quiet = logmel(torch.from_numpy(loud_then_quiet[-FEATURES.n_samples:]))
            torch.testing.assert_close(got[:, -FEATURES.n_frames:], quiet, rtol=1e-5, atol=1e-5)  # scaled alone


PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from audioclf.config import FeatureConfig
    from audioclf.data import read_folder
    from audioclf.store import FeatureBank
    FeatureBank.build(read_folder(sys.argv[1]), FeatureConfig(sample_rate=8000, duration_s=5.0),
                      cache_dir=sys.argv[2], num_workers=0, quiet=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


def test_a_ten_minute_clip_among_short_ones_costs_memory_of_one_clip_not_a_batch(tmp_path):
    def peak_rss_mb(root, cache):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(root), str(cache)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1]) / 1024

    short = tmp_path / "short"
    for k in range(8):
        wav(short / ("a" if k % 2 else "b") / f"{k}.wav", 200.0 + 100 * k, duration_s=5.0, seed=k)
    with_long = tmp_path / "with_long"
    for p in short.rglob("*.wav"):
        (with_long / p.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(p, with_long / p.parent.name / p.name)
    rng = np.random.default_rng(0)
    sf.write(with_long / "a" / "long.wav", (0.1 * rng.standard_normal(600 * SR)).astype(np.float32), SR)
    base = peak_rss_mb(short, tmp_path / "c1")
    peak = peak_rss_mb(with_long, tmp_path / "c2")
    print(f"peak RSS {base:.0f} MB without the 10-min clip, {peak:.0f} MB with it")
    assert peak - base < 300, f"the 10-min clip raised peak RSS from {base:.0f} MB to {peak:.0f} MB"


# ------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_training_lists_odd_names_and_dead_links_in_skipped_csv(tmp_path, capfd):
    from audioclf.config import resolve
    from audioclf.train import fit

    root = two_class_folder(tmp_path / "data", per_class=4)
    for k in range(4):
        wav(root / "odd" / f"{BAD}{k}.wav", 800.0, seed=k)  # file names that are not UTF-8 (class names must be)
    broken = root / "low" / f"{BAD}broken.wav"
    broken.write_bytes(b"RIFF not audio")
    (root / "high" / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    config = resolve(overrides={
        "features": {"sample_rate": SR, "duration_s": 0.5}, "model": {"backbone": "resnet18", "pretrained": "none"},
        "data": {"root": str(root), "format": "folder", "val_split": 0.25, "num_workers": 0},
        # fp32: under bf16 autocast this tiny from-scratch run could diverge on some CPUs
        "train": {"epochs": 1, "batch_size": 4, "quiet": True, "seed": 0, "amp": False}})
    fit(config, tmp_path / "run")
    with open(tmp_path / "run" / "skipped.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert rows.keys() == {str(broken), str(root / "high" / "dangling.wav")}  # the names as on disk
    assert "cannot decode" in rows[str(broken)] and rows[str(root / "high" / "dangling.wav")].startswith("broken symlink")
    assert "odd" in json.loads((tmp_path / "run" / "labels.json").read_text())
    assert "Logging error" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------- issue 21

def test_class_names_not_utf8_are_refused_at_training_and_at_load(tmp_path, capsys):
    """Decided once, at training: a class folder whose name is not UTF-8 is refused (renaming it is the fix),
    so serve, predict's CSV and evaluate never meet one; a checkpoint holding one is refused too."""
    from audioclf.checkpoint import model_from_checkpoint
    from audioclf.cli import main

    root = tmp_path / "data"
    for name in (b"caf\xe9", b"tea"):
        for k in range(6):
            wav(root / os.fsdecode(name) / f"{k}.wav", 300.0 + 100 * k, seed=k)
    with pytest.raises(AudioclfError, match=r"the class folder name 'caf\\\\xe9' is not valid UTF-8"):
        read_folder(root)
    assert main(["train", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--pretrained", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not valid UTF-8" in err, err
    with pytest.raises(AudioclfError, match="is not valid UTF-8 text"):
        model_from_checkpoint({"config": {}, "labels": [os.fsdecode(b"caf\xe9"), "tea"], "model": {}}, "x.pt")
