"""WebDataset shards: `audioclf shard` writes them, read_webdataset reads them back, training uses them
(one process, and two gloo processes under torchrun)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audioclf.webdata as webdata
from audioclf.audio import load_audio, split_member
from audioclf.checkpoint import load_checkpoint
from audioclf.cli import main
from audioclf.config import AudioclfError, DataConfig, resolve
from audioclf.data import load_clips, read_csv, read_folder
from audioclf.webdata import read_webdataset, write_shards
from conftest import SYNTH_CLASSES, SYNTH_PER_CLASS, chirp_noise, tone

N_SYNTH = len(SYNTH_CLASSES) * SYNTH_PER_CLASS


@pytest.fixture(scope="module")
def synth_shards(synth_dir, tmp_path_factory) -> Path:
    """``synth_dir`` as shards of 10 samples (read-only: share it)."""
    out = tmp_path_factory.mktemp("shards") / "synth"
    write_shards(read_folder(synth_dir), out, samples_per_shard=10, quiet=True)
    return out


def _manifest_with_folds(tmp_path) -> Path:
    """A CSV of wav and flac clips with folds and groups, one name with dots, spaces and a '#'."""
    rows = []
    for i in range(8):
        label = ("low", "high")[i % 2]
        name = f"audio/{label}.take {i}#x.v2.flac" if i == 3 else f"audio/{label}_{i}.wav"
        path = tmp_path / "ds" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(300 if label == "low" else 3000, 16000, 0.5 + 0.1 * i), 16000)
        rows.append([name, label, 1 + i % 3, f"rec{i // 2}"])
    manifest = tmp_path / "ds" / "clips.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "fold", "group"], *rows])
    return manifest


def _members(tar) -> list[str]:
    with tarfile.open(tar) as t:
        return t.getnames()


# ------------------------------------------------------------------------------------------ round trips

def test_a_folder_dataset_comes_back_from_its_shards(synth_dir, synth_shards):
    original = read_folder(synth_dir)
    back = read_webdataset(synth_shards)
    index = json.loads((synth_shards / "dataset.json").read_text())
    assert index["complete"] and index["classes"] == list(SYNTH_CLASSES) and index["samples"] == N_SYNTH
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in index["shards"]] == [10, 10, 10, 6]
    assert back.classes == original.classes and back.skipped == []
    assert [(c.label, c.fold, c.group) for c in back.clips] == [(c.label, c.fold, c.group) for c in original.clips]
    # (shard, position) order: each tar holds a contiguous run of the clips
    tars = [split_member(c.path)[0] for c in back.clips]
    assert tars == sorted(tars) and [Path(t).name for t in tars[9:11]] == ["shard-000000.tar", "shard-000001.tar"]
    for a, b in zip(original.clips, back.clips):
        np.testing.assert_array_equal(load_audio(b.path, 16000), load_audio(a.path, 16000))
    for tar in sorted(synth_shards.glob("*.tar")):
        for name in _members(tar):
            key, ext = name.split(".", 1)  # webdataset's split: one dot, keys hold none
            assert ext in ("wav", "cls", "json") and "/" not in key


def test_a_csv_with_folds_and_groups_keeps_them(tmp_path):
    manifest = _manifest_with_folds(tmp_path)
    original = read_csv(manifest)
    write_shards(original, tmp_path / "shards", samples_per_shard=3, quiet=True)
    back = read_webdataset(tmp_path / "shards")
    assert back.classes == original.classes == ["high", "low"]
    assert [(c.label, c.fold, c.group) for c in back.clips] == [(c.label, c.fold, c.group) for c in original.clips]
    for a, b in zip(original.clips, back.clips):
        np.testing.assert_array_equal(load_audio(b.path, 22050), load_audio(a.path, 22050))
    odd = [c.path for c in back.clips if c.path.endswith(".flac")]
    assert len(odd) == 1 and odd[0].rsplit("#", 1)[1] == "000003-high_take_3_x_v2.flac"  # the original bytes, its key dot-free
    tar, member = split_member(odd[0])
    with tarfile.open(tar) as t:
        meta = json.loads(t.extractfile(member.replace(".flac", ".json")).read())
    assert meta == {"label": "high", "fold": 1, "group": "rec1", "source": original.clips[3].path}
    assert (tmp_path / "ds" / "audio" / "high.take 3#x.v2.flac").read_bytes() == \
        tarfile.open(tar).extractfile(member).read()


def test_the_webdataset_package_reads_the_shards(synth_shards):
    import webdataset as wds

    urls = str(synth_shards / "shard-{000000..000003}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == N_SYNTH
    first = samples[0]
    assert first["__key__"] == "000000-chirp_000" and set(first) >= {"wav", "cls", "json"}
    assert int(first["cls"]) == 0 and json.loads(first["json"])["label"] == "chirp"
    wave, sr = sf.read(io.BytesIO(samples[-1]["wav"]))
    assert sr == 16000 and wave.shape == (16000,)
    assert [int(s["cls"]) for s in samples] == [c.label for c in read_webdataset(synth_shards).clips]


def test_clips_point_at_uncompressed_members_readable_by_offset(synth_shards):
    clip = read_webdataset(synth_shards / "shard-000002.tar").clips[4]
    tar, member = split_member(clip.path)
    with tarfile.open(tar) as t:
        assert t.extractfile(member).read()[:4] == b"RIFF"


# ------------------------------------------------------------------------------------------ what can be read

def test_patterns_lists_single_tars_and_folders(synth_shards):
    everything = read_webdataset(synth_shards)
    pattern = read_webdataset(str(synth_shards / "shard-{000000..000003}.tar"))
    assert [c.path for c in pattern.clips] == [c.path for c in everything.clips]
    part = read_webdataset(str(synth_shards / "shard-{000001..000002}.tar"))
    assert [c.path for c in part.clips] == [c.path for c in everything.clips[10:30]]
    assert part.classes == list(SYNTH_CLASSES)  # dataset.json beside the shards names the classes
    listed = read_webdataset([synth_shards / "shard-000003.tar", str(synth_shards / "shard-00000{0,1}.tar")])
    assert [c.path for c in listed.clips] == [c.path for c in everything.clips[30:] + everything.clips[:20]]
    one = read_webdataset(synth_shards / "shard-000000.tar")
    assert len(one.clips) == 10 and one.classes == list(SYNTH_CLASSES)
    cfg = DataConfig(root=str(synth_shards / "shard-{000000..000003}.tar"), format="webdataset")
    assert [c.path for c in load_clips(cfg).clips] == [c.path for c in everything.clips]


def test_a_missing_shard_in_a_pattern_is_named(synth_shards):
    pattern = str(synth_shards / "shard-{000000..000005}.tar")
    with pytest.raises(AudioclfError, match=r"shard-000004\.tar and 1 more: no such shard file \(from the pattern "
                                            r".*shard-\{000000\.\.000005\}\.tar, 6 paths\)"):
        read_webdataset(pattern)
    with pytest.raises(AudioclfError, match=r"nope\.tar: no such shard file$"):
        read_webdataset(synth_shards / "nope.tar")
    with pytest.raises(AudioclfError, match="not a valid brace pattern"):
        read_webdataset(str(synth_shards / "shard-{000000..000003.tar"))


@pytest.mark.parametrize("url", ["http://example.com/shards-{000..009}.tar", "s3://bucket/shard-000000.tar",
                                 "pipe:curl -s http://x/shard.tar", "gs://b/x.tar"])
def test_remote_shards_are_refused(url):
    with pytest.raises(AudioclfError, match="remote shards are not supported yet; download them"):
        read_webdataset(url)


def test_a_folder_without_an_index_and_a_half_index(synth_shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in synth_shards.glob("*.tar"):
        (bare / tar.name).write_bytes(tar.read_bytes())
    back = read_webdataset(bare)  # every *.tar, sorted; classes from the .json labels
    assert back.classes == list(SYNTH_CLASSES) and len(back.clips) == N_SYNTH
    index = json.loads((synth_shards / "dataset.json").read_text())
    (bare / "dataset.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(AudioclfError, match=r"dataset\.json: the `audioclf shard` run that wrote these shards did not finish"):
        read_webdataset(bare)
    (bare / "dataset.json").write_text(json.dumps({"format": "audioclf-webdataset", "complete": True, "shards": 3}))
    with pytest.raises(AudioclfError, match="changed or damaged"):
        read_webdataset(bare)
    (bare / "dataset.json").write_text('{"something": "else"}')  # another tool's file: not ours, ignored
    assert len(read_webdataset(bare).clips) == N_SYNTH
    (bare / "dataset.json").write_text(json.dumps(index))
    (bare / "shard-000002.tar").unlink()
    with pytest.raises(AudioclfError, match=r"lists 1 shard\(s\) that are not there, e.g. .*shard-000002\.tar"):
        read_webdataset(bare)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AudioclfError, match=r"empty: holds no \.tar shards"):
        read_webdataset(empty)


def _write_tar(path, samples: list[dict]) -> Path:
    """A shard written by the webdataset package alone, no dataset.json."""
    from webdataset import TarWriter

    with TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def _wav_bytes(wave, sample_rate=16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV")
    return buf.getvalue()


def test_samples_without_audio_or_label_are_skipped_with_the_reason(tmp_path):
    wav = _wav_bytes(tone(440, 16000, 0.5))
    tar = _write_tar(tmp_path / "mixed.tar", [
        {"__key__": "good", "wav": wav, "cls": 1},
        {"__key__": "nolabel", "wav": wav},
        {"__key__": "noaudio", "cls": 0, "txt": "hello"},
        {"__key__": "twoaudio", "wav": wav, "flac": wav, "cls": 0},
        {"__key__": "badjson", "wav": wav, "json": b"{not json"},
        {"__key__": "badcls", "wav": wav, "cls": "dog"},
        {"__key__": "badfold", "wav": wav, "json": {"label": "0", "fold": "one"}},
        {"__key__": "named", "wav": wav, "json": {"label": "0", "fold": 2, "group": 7}},
        {"__key__": "negative", "wav": wav, "json": {"label": -1}},
        {"__key__": "jsonindex", "flac": wav, "json": {"label": 1}},
    ])
    cs = read_webdataset(tar)
    assert cs.classes == ["0", "1"]
    assert [(Path(c.path).name, c.label, c.fold, c.group) for c in cs.clips] == [
        ("mixed.tar#good.wav", 1, None, None), ("mixed.tar#named.wav", 0, 2, "7"), ("mixed.tar#jsonindex.flac", 1, None, None)]
    reasons = {p.rsplit("#", 1)[1]: r for p, r in cs.skipped}
    assert reasons["nolabel"] == 'no label: neither a .json with a "label" nor a .cls'
    assert reasons["noaudio"].startswith("no audio member (one of .wav, .flac")
    assert reasons["twoaudio"] == "more than one audio member (flac, wav); a sample holds exactly one"
    assert reasons["negative"] == "class index -1 is negative"
    assert reasons["badjson"].startswith("its .json is not valid JSON")
    assert reasons["badcls"] == "its .cls holds 'dog', not a class index"
    assert reasons["badfold"] == "fold 'one' in its .json is not a whole number"
    with pytest.raises(AudioclfError, match=r"no sample with audio and a label in 1 shard\(s\); e.g. .*#x: no label"):
        read_webdataset(_write_tar(tmp_path / "useless.tar", [{"__key__": "x", "wav": wav}]))


def test_class_indices_sort_as_numbers_and_dataset_json_names_them(tmp_path):
    wav = _wav_bytes(tone(440, 16000, 0.5))
    shards = tmp_path / "s"
    shards.mkdir()
    _write_tar(shards / "a.tar", [{"__key__": f"k{i}", "wav": wav, "cls": i} for i in (10, 2, 9)])
    assert read_webdataset(shards).classes == ["2", "9", "10"]
    (shards / "dataset.json").write_text(json.dumps({"format": "audioclf-webdataset", "complete": True,
                                                     "classes": [f"c{i}" for i in range(10)],
                                                     "shards": [{"name": "a.tar", "samples": 3}]}))
    cs = read_webdataset(shards)
    assert cs.classes == [f"c{i}" for i in range(10)]
    assert [c.label for c in cs.clips] == [2, 9]
    assert cs.skipped[0][1] == "class index 10 is outside the 10 classes of dataset.json"


# ------------------------------------------------------------------------------------------ writing

def test_sizes_split_shards_and_a_clip_larger_than_the_limit_stands_alone(synth_dir, tmp_path):
    clips = read_folder(synth_dir)
    r = write_shards(clips, tmp_path / "by_size", samples_per_shard=1000, max_shard_bytes=3 * 40_000, quiet=True)
    counts = [s["samples"] for s in json.loads((tmp_path / "by_size" / "dataset.json").read_text())["shards"]]
    assert counts == [3] * 12 and r["samples"] == N_SYNTH  # 32 kB clips: three fit in 120 kB, four do not
    assert all(p.stat().st_size <= 3 * 40_000 for p in (tmp_path / "by_size").glob("*.tar"))
    r = write_shards(clips, tmp_path / "tiny", max_shard_bytes=1000, quiet=True)
    assert len(r["shards"]) == N_SYNTH
    for bad in (0, -3, 2.5):
        with pytest.raises(AudioclfError, match=f"samples_per_shard={bad!r} must be a whole number >= 1"):
            write_shards(clips, tmp_path / "x", samples_per_shard=bad)


def test_unreadable_clips_are_skipped_and_counted(tmp_path):
    manifest = _manifest_with_folds(tmp_path)
    (tmp_path / "ds" / "audio" / "high_1.wav").write_bytes(b"garbage, not audio" * 10)
    (tmp_path / "ds" / "audio" / "high_5.wav").unlink()
    r = write_shards(read_csv(manifest), tmp_path / "shards", quiet=True)
    assert r["samples"] == 6
    reasons = dict(r["skipped"])
    assert "missing" in reasons[str(tmp_path / "ds" / "audio" / "high_5.wav")]
    assert "cannot decode" in reasons[os.path.realpath(tmp_path / "ds" / "audio" / "high_1.wav")]
    assert len(json.loads((tmp_path / "shards" / "dataset.json").read_text())["skipped"]) == 2
    assert len(read_webdataset(tmp_path / "shards").clips) == 6


def test_an_interrupted_run_leaves_no_shard_that_looks_whole(synth_dir, tmp_path, monkeypatch):
    clips = read_folder(synth_dir)
    out = tmp_path / "shards"
    real, calls = webdata.read_source, []

    def interrupt_at_the_fifteenth(path):
        calls.append(path)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(webdata, "read_source", interrupt_at_the_fifteenth)
    with pytest.raises(KeyboardInterrupt):
        write_shards(clips, out, samples_per_shard=10, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard-000000.tar"]  # no half shard, no temp file
    assert not json.loads((out / "dataset.json").read_text())["complete"]
    with pytest.raises(AudioclfError, match="did not finish; run it again"):
        read_webdataset(out)
    monkeypatch.undo()
    r = write_shards(clips, out, samples_per_shard=10, quiet=True)  # again into the same folder: starts over
    assert r["samples"] == N_SYNTH and len(read_webdataset(out).clips) == N_SYNTH
    with pytest.raises(AudioclfError, match="holds a finished shard set already"):
        write_shards(clips, out, quiet=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.tar").write_bytes(b"")
    with pytest.raises(AudioclfError, match=r"holds \.tar files \(data\.tar\) that are not from an audioclf shard run"):
        write_shards(clips, foreign, quiet=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AudioclfError, match="is a file; give a folder"):
        write_shards(clips, tmp_path / "file", quiet=True)


def test_shards_of_shards(synth_shards, tmp_path):
    again = write_shards(read_webdataset(synth_shards), tmp_path / "again", samples_per_shard=18, quiet=True)
    assert again["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    a, b = read_webdataset(synth_shards), read_webdataset(tmp_path / "again")
    assert [c.label for c in a.clips] == [c.label for c in b.clips]
    np.testing.assert_array_equal(load_audio(a.clips[20].path, 16000), load_audio(b.clips[20].path, 16000))


def test_the_shard_command(synth_dir, tmp_path, capsys):
    out = tmp_path / "cmd"
    assert main(["shard", str(synth_dir), "--out", str(out), "--samples-per-shard", "16", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"3 shard(s), {N_SYNTH} samples, 0 skipped: {out}"
    assert [c.label for c in read_webdataset(out).clips] == [c.label for c in read_folder(synth_dir).clips]
    manifest = _manifest_with_folds(tmp_path)
    (tmp_path / "ds" / "audio" / "low_0.wav").unlink()
    assert main(["shard", str(manifest), "--out", str(tmp_path / "csv"), "--quiet", "--max-shard-mb", "0.02"]) == 0
    assert capsys.readouterr().out.startswith("7 shard(s), 7 samples, 1 skipped")
    assert main(["shard", str(synth_dir), "--out", str(tmp_path / "e"), "--esc10"]) == 2
    assert "--esc10 applies to format 'esc50' only" in capsys.readouterr().err
    assert main(["shard", str(synth_dir), "--out", str(tmp_path / "n"), "--max-shard-mb", "nan"]) == 2
    assert "--max-shard-mb nan: must be a number > 0" in capsys.readouterr().err
    assert main(["shard", str(out / "shard-{000000..000009}.tar"), "--out", str(tmp_path / "m")]) == 2  # guessed: webdataset
    assert "no such shard file (from the pattern" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ training

SMALL = {"features": {"sample_rate": 16000, "duration_s": 1.0}, "model": {"backbone": "resnet18", "pretrained": "none"}}


def _config(root, fmt, **data):
    train = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "scheduler": "cosine", "patience": 0, "quiet": True, "seed": 3}
    return resolve(overrides={**SMALL, "data": {"root": str(root), "format": fmt, "val_split": 0.25, **data}, "train": train})


@pytest.mark.slow
def test_training_on_shards_equals_training_on_the_folder(synth_dir, synth_shards, tmp_path):
    from audioclf.evaluate import evaluate
    from audioclf.train import fit

    fit(_config(synth_shards, "webdataset"), tmp_path / "shards")
    fit(_config(synth_dir, "folder"), tmp_path / "folder")
    a, b = load_checkpoint(tmp_path / "shards" / "last.pt"), load_checkpoint(tmp_path / "folder" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["labels"] == b["labels"] == list(SYNTH_CLASSES)
    for k in a["model"]:  # the same clips, bytes and order: the same split, features and model
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (tmp_path / "shards" / "metrics.csv").read_text().count("\n") == 3
    m = evaluate(tmp_path / "shards", DataConfig(root=str(synth_shards / "shard-{000001..000002}.tar"),
                                                 format="webdataset"), out_dir=tmp_path / "eval", device="cpu", quiet=True)
    assert m["n_clips"] == 20 and m["skipped"] == []  # prediction streams the members like files


@pytest.mark.slow
def test_a_cls_only_tar_from_plain_webdataset_trains(tmp_path):
    from audioclf.train import fit

    samples = []
    for i in range(24):
        k = i % 2
        wave = tone(500, 16000, 1.0) if k == 0 else chirp_noise(16000, 1.0, seed=i)
        samples.append({"__key__": f"s{i:03d}", "wav": _wav_bytes(wave), "cls": k})
    _write_tar(tmp_path / "plain-0.tar", samples[:16])
    _write_tar(tmp_path / "plain-1.tar", samples[16:])
    summary = fit(_config(tmp_path / "plain-{0..1}.tar", "webdataset"), tmp_path / "run")
    assert summary["epochs_run"] == 2
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["0", "1"]
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "best.pt").is_file()


# A training under torchrun that counts its optimiser steps: every rank writes how many it took.
_COUNTING_TRAIN = """
import os, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from audioclf.cli import main
steps = [0]
def count(optimizer, args, kwargs):
    steps[0] += 1
register_optimizer_step_post_hook(count)
code = main(sys.argv[1:])
with open(os.path.join(os.environ["STEPS_DIR"], "rank" + os.environ["RANK"]), "w") as f:
    f.write(str(steps[0]))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_gloo_processes_train_on_shards_in_step(synth_dir, tmp_path):
    # uneven shards (13 + 13 + 10 samples) across 2 ranks: the classic WebDataset hang if steps differed
    shards = tmp_path / "shards"
    write_shards(read_folder(synth_dir), shards, samples_per_shard=13, quiet=True)
    script = tmp_path / "counting_train.py"
    script.write_text(_COUNTING_TRAIN)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train",
           str(shards), "--format", "webdataset", "--out", str(out), "--backbone", "resnet18", "--no-pretrained",
           "--sample-rate", "16000", "--duration", "1.0", "--batch-size", "4", "--lr", "1e-3", "--scheduler", "cosine",
           "--patience", "0", "--seed", "5", "--quiet", "--epochs", "2", "--device", "cpu", "--val-split", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPS_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 2
    log = (out / "train.log").read_text()
    assert "x2 processes" in log
    n_train = int(re.search(r"train: (\d+) clips", log).group(1))
    steps = [int((tmp_path / f"rank{k}").read_text()) for k in (0, 1)]
    assert steps == [2 * math.ceil(math.ceil(n_train / 2) / 4)] * 2, (n_train, steps)  # 2 epochs, 2 ranks, batch 4
    # rank 0 speaks for the job: one summary line and one log line per epoch, not one per process
    assert r.stdout.count("best validation loss") == 1, r.stdout
    assert r.stderr.count("INFO audioclf.train: epoch   2") == 1, r.stderr[-3000:]


def test_a_manifest_may_list_tar_members(synth_shards, tmp_path):
    # cv writes folds.csv from the clips of a dataset without folds, then reads it as a CSV
    from audioclf.data import write_folds

    shards = read_webdataset(synth_shards)
    manifest = write_folds(shards, tmp_path / "folds.csv", 3, seed=0)
    back = read_csv(manifest)
    assert [(c.path, c.label) for c in back.clips] == [(c.path, c.label) for c in shards.clips]
    assert {c.fold for c in back.clips} == {1, 2, 3} and back.skipped == []
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerow([f"{split_member(shards.clips[0].path)[0]}#no-such-key.wav", "tone", 1, "g"])
    assert read_csv(manifest).skipped == [(f"{split_member(shards.clips[0].path)[0]}#no-such-key.wav",
                                           "file listed in the metadata is missing")]


def test_rewriting_a_shard_changes_the_feature_store_key(synth_dir, tmp_path):
    from audioclf.config import FeatureConfig
    from audioclf.store import cache_key

    out = tmp_path / "shards"
    write_shards(read_folder(synth_dir), out, quiet=True)
    clips = read_webdataset(out).clips
    before = cache_key(clips, FeatureConfig())
    tar = split_member(clips[0].path)[0]
    st = os.stat(tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the shard written again, same path and size
    # features cached from the old tar must not be reused for the new one
    assert cache_key(clips, FeatureConfig()) != before
