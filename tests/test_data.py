import csv
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

import audioclf.store as store_module
from audioclf.audio import inference_windows, load_audio
from audioclf.config import AudioclfError, DataConfig, FeatureConfig
from audioclf.data import (Clip, ClipSet, assign_folds, check_classes, load_clips, read_csv, read_esc50, read_folder,
                           split_clips, write_folds)
from audioclf.features import LogMel
from audioclf.store import FeatureBank, default_cache_dir
from conftest import SYNTH_CLASSES, SYNTH_PER_CLASS, tone

ESC10_CLASSES = ["dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing", "clock_tick",
                 "helicopter", "chainsaw"]
FEATURES = FeatureConfig(sample_rate=22050, duration_s=1.0)


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def touch_wav(path, freq=440.0, duration_s=0.2, sample_rate=16000):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(freq, sample_rate, duration_s), sample_rate)
    return path


# ------------------------------------------------------------------------------------------------ folder

def test_read_folder_synthetic(synth_dir):
    cs = read_folder(synth_dir)
    assert cs.classes == sorted(SYNTH_CLASSES)
    assert len(cs.clips) == len(SYNTH_CLASSES) * SYNTH_PER_CLASS
    assert Counter(c.label for c in cs.clips) == {i: SYNTH_PER_CLASS for i in range(len(SYNTH_CLASSES))}
    for c in cs.clips:
        assert c.path.startswith(str(synth_dir.resolve())) and f"/{cs.classes[c.label]}/" in c.path
        assert c.fold is None and c.group is None


def test_read_folder_nesting_sorting_and_ignored_entries(tmp_path, caplog):
    touch_wav(tmp_path / "zebra" / "a.wav")
    touch_wav(tmp_path / "Alpha" / "take1" / "deep" / "b.flac")  # nested below the class folder: counts
    touch_wav(tmp_path / "Alpha" / "c.WAV")
    touch_wav(tmp_path / ".hidden" / "d.wav")  # hidden folder: not a class
    touch_wav(tmp_path / "loose.wav")  # not in a class folder
    (tmp_path / "zebra" / "notes.txt").write_text("not audio")
    (tmp_path / "empty").mkdir()
    cs = read_folder(tmp_path)
    assert cs.classes == ["Alpha", "zebra"]  # sorted; the empty folder is left out
    names = {(cs.classes[c.label], c.path.rsplit("/", 1)[-1]) for c in cs.clips}
    assert names == {("Alpha", "b.flac"), ("Alpha", "c.WAV"), ("zebra", "a.wav")}
    assert "empty" in caplog.text and "no audio files" in caplog.text


def test_read_folder_refuses_a_file(tmp_path):
    with pytest.raises(AudioclfError, match="x.csv: not a folder"):
        read_folder(tmp_path / "x.csv")


# --------------------------------------------------------------------------------------------------- csv

def test_read_csv_relative_paths_folds_groups(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    touch_wav(root / "audio" / "1.wav")
    touch_wav(root / "audio" / "2.wav")
    touch_wav(root / "audio" / "3.wav")
    absolute = touch_wav(tmp_path / "elsewhere" / "4.wav")
    manifest = write_csv(root / "meta" / "list.csv", ["path", "label", "fold", "group"], [
        ["../audio/1.wav", "dog", "1", "rec1"],
        ["../audio/2.wav", "cat", "2", "rec1"],
        ["../audio/3.wav", "dog", "", ""],
        [str(absolute), "bird", "3", "rec9"],
    ])
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the CSV's folder, not the cwd
    cs = read_csv(manifest)
    assert cs.classes == ["bird", "cat", "dog"]
    assert cs.skipped == []
    by_name = {c.path.rsplit("/", 1)[-1]: c for c in cs.clips}
    assert by_name["1.wav"] == Clip(str((root / "audio" / "1.wav").resolve()), 2, 1, "rec1")
    assert (by_name["2.wav"].label, by_name["2.wav"].fold, by_name["2.wav"].group) == (1, 2, "rec1")
    assert (by_name["3.wav"].fold, by_name["3.wav"].group) == (None, None)
    assert by_name["4.wav"].path == str(absolute.resolve())


def test_read_csv_without_optional_columns(tmp_path):
    touch_wav(tmp_path / "a.wav")
    cs = read_csv(write_csv(tmp_path / "m.csv", ["label", "path"], [["x", "a.wav"], ["y", "missing.wav"]]))
    assert [c.fold for c in cs.clips] == [None]
    assert cs.skipped == [(str(tmp_path / "missing.wav"), "file listed in the metadata is missing")]


def test_read_csv_missing_columns_names_the_file(tmp_path):
    manifest = write_csv(tmp_path / "manifest.csv", ["file", "label"], [["a.wav", "x"]])
    with pytest.raises(AudioclfError, match=r"manifest.csv: missing column\(s\) path.*found: file, label"):
        read_csv(manifest)


def test_read_csv_bad_fold_names_the_file(tmp_path):
    touch_wav(tmp_path / "a.wav")
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "fold"], [["a.wav", "x", "one"]])
    with pytest.raises(AudioclfError, match="m.csv: fold='one' is not an integer"):
        read_csv(manifest)


def test_read_csv_missing_file(tmp_path):
    with pytest.raises(AudioclfError, match="nope.csv: cannot read"):
        read_csv(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------ esc50 / urbansound

def fake_esc50(root, drop=()):
    """Three categories with ESC-50 targets out of order; two clips per category, ESC-10 for two of them."""
    rows = []
    for target, category, esc10 in [(41, "chainsaw", True), (0, "dog", True), (7, "insects", False)]:
        for fold, src in [(1, f"{target}01"), (2, f"{target}02")]:
            name = f"{fold}-{src}-A-{target}.wav"
            rows.append([name, fold, target, category, str(esc10), src, "A"])
            if name not in drop:
                touch_wav(root / "audio" / name)
    write_csv(root / "meta" / "esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
              rows)
    return root


def test_read_esc50_labels_in_target_order_and_missing_audio_is_skipped(tmp_path):
    root = fake_esc50(tmp_path / "esc", drop={"2-4102-A-41.wav"})
    cs = read_esc50(root)
    assert cs.classes == ["dog", "insects", "chainsaw"]  # target 0, 7, 41
    assert len(cs.clips) == 5
    assert [s[0].rsplit("/", 1)[-1] for s in cs.skipped] == ["2-4102-A-41.wav"]
    assert "missing" in cs.skipped[0][1]
    dog = [c for c in cs.clips if c.label == 0]
    assert {(c.fold, c.group) for c in dog} == {(1, "001"), (2, "002")}


def test_read_esc50_esc10_subset(tmp_path):
    cs = read_esc50(fake_esc50(tmp_path / "esc"), esc10=True)
    assert cs.classes == ["dog", "chainsaw"]
    assert len(cs.clips) == 4


def test_load_clips_esc50_with_a_missing_file_is_not_fatal(tmp_path):
    root = fake_esc50(tmp_path / "esc", drop={"1-001-A-0.wav"})
    cs = load_clips(DataConfig(root=str(root), format="esc50"))
    assert len(cs.clips) == 5 and len(cs.skipped) == 1


def test_urbansound8k_layout(tmp_path):
    root = tmp_path / "UrbanSound8K"
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    rows = [
        ["100032-3-0-0.wav", "100032", "0.0", "0.3", "1", "5", "3", "dog_bark"],
        ["100032-3-0-1.wav", "100032", "0.3", "0.6", "1", "5", "3", "dog_bark"],
        ["100263-2-0-117.wav", "100263", "58.5", "62.5", "1", "5", "2", "children_playing"],
        ["101415-2-0-1.wav", "101415", "1.0", "5.0", "2", "1", "2", "children_playing"],
        ["102305-6-0-0.wav", "102305", "0.0", "2.6", "1", "1", "6", "gun_shot"],
        ["102305-6-0-1.wav", "102305", "2.6", "3.1", "1", "1", "6", "gun_shot"],
    ]
    write_csv(root / "metadata" / "UrbanSound8K.csv", header, rows)
    for r in rows[:4] + rows[5:]:  # one gun shot's audio is missing
        touch_wav(root / "audio" / f"fold{r[5]}" / r[0])
    cs = load_clips(DataConfig(root=str(root), format="urbansound8k"))
    assert cs.classes == ["children_playing", "dog_bark", "gun_shot"]  # classID 2, 3, 6
    assert len(cs.clips) == 5 and cs.skipped[0][0].endswith("fold1/102305-6-0-0.wav")
    bark = [c for c in cs.clips if c.label == 1]
    assert {c.group for c in bark} == {"100032"} and {c.fold for c in bark} == {5}


# ----------------------------------------------------------------------------------------- load_clips

def test_load_clips_reads_the_synthetic_folder(synth_dir):
    cs = load_clips(DataConfig(root=str(synth_dir)))
    assert len(cs.clips) == 36 and cs.describe() == "36 clips, 3 classes, 36 groups"


def test_load_clips_refuses_one_class(tmp_path):
    touch_wav(tmp_path / "only" / "a.wav")
    with pytest.raises(AudioclfError, match=r"found 1 class\(es\) \['only'\].*at least 2"):
        load_clips(DataConfig(root=str(tmp_path)))


def test_load_clips_refuses_a_class_without_readable_clips(tmp_path):
    touch_wav(tmp_path / "a.wav")
    touch_wav(tmp_path / "b.wav")
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"],
                         [["a.wav", "cat"], ["b.wav", "cat"], ["gone.wav", "owl"]])
    with pytest.raises(AudioclfError, match="class\\(es\\) owl have no readable clips"):
        load_clips(DataConfig(root=str(manifest), format="csv"))


def test_load_clips_refuses_no_root_and_misplaced_esc10(synth_dir):
    with pytest.raises(AudioclfError, match="no dataset given"):
        load_clips(DataConfig())
    with pytest.raises(AudioclfError, match="esc10.*'esc50' only"):
        load_clips(DataConfig(root=str(synth_dir), esc10=True))


def test_check_classes_counts_labels_not_folders():
    cs = ClipSet([Clip("/a", 0), Clip("/b", 0)], ["x", "y", "z"])
    with pytest.raises(AudioclfError, match="y, z have no readable clips"):
        check_classes(cs, "here")


# --------------------------------------------------------------------------------------------- splits

def grouped_clips(n_groups=40, per_group=3, n_labels=4, folds=None):
    """Clips cut from ``n_groups`` recordings; a recording has one label (and one fold, if given)."""
    return [Clip(f"/d/g{g:02d}_{k}.wav", g % n_labels, None if folds is None else 1 + g % folds, f"g{g:02d}")
            for g in range(n_groups) for k in range(per_group)]


def test_fold_split_takes_whole_folds():
    clips = grouped_clips(folds=5)
    s = split_clips(clips, val_fold=4, test_fold=5)
    assert {c.fold for c in s["val"]} == {4} and {c.fold for c in s["test"]} == {5}
    assert {c.fold for c in s["train"]} == {1, 2, 3}
    assert len(s["train"]) + len(s["val"]) + len(s["test"]) == len(clips)


def test_test_fold_alone_then_group_split_of_the_rest():
    clips = grouped_clips(folds=5)
    s = split_clips(clips, test_fold=1, val_split=0.25, seed=0)
    assert {c.fold for c in s["test"]} == {1}
    assert all(c.fold != 1 for c in s["train"] + s["val"])
    assert not {c.group for c in s["train"]} & {c.group for c in s["val"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_keeps_groups_on_one_side_and_stratifies(seed):
    clips = grouped_clips()
    s = split_clips(clips, val_split=0.2, seed=seed)
    train_groups, val_groups = {c.group for c in s["train"]}, {c.group for c in s["val"]}
    assert not train_groups & val_groups
    assert len(s["train"]) + len(s["val"]) == len(clips) and s["test"] == []
    assert 0.1 <= len(s["val"]) / len(clips) <= 0.3
    assert {c.label for c in s["val"]} == {0, 1, 2, 3}  # every label is represented
    assert s == split_clips(clips, val_split=0.2, seed=seed)  # deterministic for a seed


def test_group_split_depends_on_seed():
    clips = grouped_clips()
    assert split_clips(clips, seed=0)["val"] != split_clips(clips, seed=1)["val"]


def test_clips_without_group_are_their_own_group():
    clips = [Clip(f"/d/{i}.wav", i % 2) for i in range(20)]
    s = split_clips(clips, val_split=0.25)
    assert len(s["val"]) == 5


def test_bad_val_fold_lists_the_folds():
    with pytest.raises(AudioclfError, match=r"val_fold=7 has no clips; folds in this dataset: \[1, 2, 3\]"):
        split_clips(grouped_clips(folds=3), val_fold=7)
    with pytest.raises(AudioclfError, match="test_fold=1 has no clips.*no fold column"):
        split_clips(grouped_clips(), test_fold=1)


def test_too_few_groups_is_refused():
    clips = grouped_clips(n_groups=3, per_group=10, n_labels=3)
    with pytest.raises(AudioclfError, match="only 3 group\\(s\\)"):
        split_clips(clips, val_split=0.2)


def test_assigned_folds_keep_groups_whole_and_stratify():
    clips = grouped_clips(n_groups=40, per_group=3, n_labels=4)
    folds = assign_folds(clips, 5, seed=0)
    assert sorted(set(folds)) == [1, 2, 3, 4, 5]
    fold_of_group = defaultdict(set)
    for c, k in zip(clips, folds):
        fold_of_group[c.group].add(k)
    assert all(len(ks) == 1 for ks in fold_of_group.values())  # a recording never straddles two folds
    for k in range(1, 6):  # 10 recordings of each label: 2 per fold
        assert Counter(c.label for c, f in zip(clips, folds) if f == k) == {0: 6, 1: 6, 2: 6, 3: 6}
    assert assign_folds(clips, 5, seed=0) == folds and assign_folds(clips, 5, seed=1) != folds
    with pytest.raises(AudioclfError, match="n_folds=41.*40 group"):
        assign_folds(clips, 41, seed=0)


def test_written_folds_read_back_as_a_manifest(tmp_path):
    paths = [str(touch_wav(tmp_path / "audio" / f"c{i:02d}.wav")) for i in range(12)]
    clips = [Clip(p, i % 2, None, f"g{i // 2}" if i < 8 else None) for i, p in enumerate(paths)]
    path = write_folds(ClipSet(clips, ["a", "b"]), tmp_path / "folds.csv", 3, seed=0)
    back = read_csv(path)
    assert back.classes == ["a", "b"] and back.skipped == []
    assert [(c.path, c.label, c.fold) for c in back.clips] == \
           [(c.path, c.label, k) for c, k in zip(clips, assign_folds(clips, 3, seed=0))]
    assert [c.group for c in back.clips] == [c.group or c.path for c in clips]  # a clip alone is its own group

@pytest.mark.shared_data
def test_esc10_shared_copy(esc50_root):
    cs = read_esc50(esc50_root, esc10=True)
    assert len(cs.clips) == 320 and cs.skipped == []
    assert cs.classes == ESC10_CLASSES
    assert Counter(c.fold for c in cs.clips) == {1: 80, 2: 80, 3: 80, 4: 80}
    assert Counter(c.label for c in cs.clips) == {i: 32 for i in range(10)}
    for c in cs.clips:
        name = c.path.rsplit("/", 1)[-1]  # <fold>-<src_file>-<take>-<target>.flac
        fold, src_file = name.split("-")[:2]
        assert (c.fold, c.group) == (int(fold), src_file)
    dogs = [c for c in cs.clips if c.label == 0]
    assert all(c.path.endswith("-0.flac") for c in dogs)
    s = split_clips(cs.clips, val_fold=3, test_fold=4)
    sides = defaultdict(set)
    for side, clips in s.items():
        for c in clips:
            sides[c.group].add(side)
    assert all(len(v) == 1 for v in sides.values())
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (160, 80, 80)


# ------------------------------------------------------------------------------------------ FeatureBank

@pytest.fixture
def small_set(synth_dir, tmp_path):
    """A private copy of 4 synthetic clips per class (it can be damaged), as a ClipSet."""
    root = tmp_path / "small"
    for name in SYNTH_CLASSES:
        (root / name).mkdir(parents=True)
        for f in sorted((synth_dir / name).iterdir())[:4]:
            shutil.copy(f, root / name / f.name)
    return root


def build(clipset, features=FEATURES, **kw):
    kw.setdefault("num_workers", 0)
    return FeatureBank.build(clipset, features, quiet=True, **kw)


def test_feature_bank_matches_logmel_of_each_clip(small_set, tmp_path):
    cs = read_folder(small_set)
    short = FeatureConfig(sample_rate=22050, duration_s=0.5)  # clips (1 s) are longer: in windows, as prediction cuts them
    long = FeatureConfig(sample_rate=22050, duration_s=1.5)  # clips are shorter: zero-padded first
    for features in (short, long):
        bank = build(cs, features, cache_dir=tmp_path / "cache", batch_size=5)
        assert len(bank) == len(cs.clips) and bank.skipped == []
        logmel = LogMel(features)
        for i in (0, 5, 11):
            wave = torch.from_numpy(load_audio(cs.clips[i].path, 22050))
            windows = inference_windows(wave, features.n_samples, features.n_samples // 2)
            want = torch.cat([logmel(w) for w in windows], dim=1)
            got = bank.clip_frames(i)
            assert got.shape == want.shape and got.shape[1] == len(windows) * features.n_frames
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert bank.clip_frames(0).shape[1] == long.n_frames


def test_feature_bank_batch_crops(small_set, tmp_path):
    cs = read_folder(small_set)
    features = FeatureConfig(sample_rate=22050, duration_s=0.5)
    bank = build(cs, features, cache_dir=tmp_path)
    idx = torch.tensor([0, 4, 8])
    x, y = bank.batch(idx)
    assert x.shape == (3, 80, features.n_frames) and y.tolist() == [cs.clips[i].label for i in (0, 4, 8)]
    full = bank.clip_frames(4)  # 1-s clip in 0.5-s windows every 0.25 s, the last one end-aligned: 4 windows
    windows = full.split(features.n_frames, dim=1)
    assert len(windows) == 4 and torch.equal(x[1], windows[1])  # the middle window (of 0..3, the lower)
    g = torch.Generator().manual_seed(0)
    picked = set()
    for _ in range(20):
        xr, _ = bank.batch(idx, random_crop=True, generator=g)
        match = [k for k, w in enumerate(windows) if torch.equal(w, xr[1])]
        assert match
        picked.add(match[0])
    assert picked == {0, 1, 2, 3}
    again = torch.Generator().manual_seed(0)
    assert torch.equal(bank.batch(idx, random_crop=True, generator=again)[0],
                       bank.batch(idx, random_crop=True, generator=torch.Generator().manual_seed(0))[0])
    assert torch.equal(bank.indices([cs.clips[8], cs.clips[0]]), torch.tensor([8, 0]))


def test_feature_bank_skips_a_corrupt_clip_or_fails_in_strict_mode(small_set, tmp_path, caplog):
    bad = small_set / "noise" / "corrupt.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    cs = read_folder(small_set)
    assert len(cs.clips) == 13
    with pytest.raises(AudioclfError, match="strict.*corrupt.wav"):
        build(cs, cache_dir=tmp_path / "c1", strict=True)
    bank = build(cs, cache_dir=tmp_path / "c2")
    assert len(bank) == 12 and str(bad) not in {c.path for c in bank.clips}
    assert [p for p, _ in bank.skipped] == [str(bad.resolve())]
    assert "corrupt.wav" in bank.skipped[0][1] and "cannot decode" in bank.skipped[0][1]
    assert "skipping clip" in caplog.text
    # Labels follow the kept clips, not the original rows.
    assert bank.labels.tolist() == [c.label for c in cs.clips if c.path != str(bad.resolve())]
    # The cached build remembers the skip, and strict mode still refuses it.
    again = build(cs, cache_dir=tmp_path / "c2")
    assert again.skipped == bank.skipped and len(again) == 12
    with pytest.raises(AudioclfError, match="strict.*corrupt.wav"):
        build(cs, cache_dir=tmp_path / "c2", strict=True)


def test_feature_bank_refuses_when_nothing_is_readable(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(AudioclfError, match="none of the clips could be read"):
        build(read_folder(tmp_path), cache_dir=tmp_path / "cache")


def stores(cache):
    return sorted(p for p in cache.glob("features-*") if (p / "manifest.json").is_file())


def same_features(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(a.clip_frames(i), b.clip_frames(i)) for i in range(len(a)))


def test_feature_cache_hit_and_miss(small_set, tmp_path, monkeypatch):
    cs = read_folder(small_set)
    cache = tmp_path / "cache"
    calls = []
    real_load = store_module.load_audio

    def counting_load(path, sample_rate):
        calls.append(path)
        return real_load(path, sample_rate)

    monkeypatch.setattr(store_module, "load_audio", counting_load)
    first = build(cs, cache_dir=cache)
    assert len(calls) == 12 and len(stores(cache)) == 1
    assert not list(cache.rglob("*.tmp*"))

    calls.clear()
    second = build(cs, cache_dir=cache)
    assert calls == []  # nothing decoded
    assert same_features(second, first) and torch.equal(second.lengths, first.lengths)
    assert second.clips == first.clips

    changed = FeatureConfig(sample_rate=22050, duration_s=1.0, n_mels=64)
    third = build(cs, changed, cache_dir=cache)
    assert len(calls) == 12 and third.clip_frames(0).shape[0] == 64
    assert len(stores(cache)) == 2

    calls.clear()
    touched = small_set / SYNTH_CLASSES[0] / sorted(p.name for p in (small_set / SYNTH_CLASSES[0]).iterdir())[0]
    touch_wav(touched, freq=1234.0, duration_s=1.0)  # a changed file changes the key
    build(cs, cache_dir=cache)
    assert len(calls) == 12


def test_feature_cache_survives_a_damaged_file(small_set, tmp_path):
    cs = read_folder(small_set)
    first = build(cs, cache_dir=tmp_path)
    (shard,) = tmp_path.glob("features-*/shard-*.npy")
    shard.write_bytes(b"not a numpy file")
    rebuilt = build(cs, cache_dir=tmp_path)
    assert same_features(rebuilt, first)


def test_default_cache_dir_is_the_test_environment(tmp_path_factory):
    assert str(default_cache_dir()).startswith(str(tmp_path_factory.getbasetemp()))


def test_feature_bank_with_worker_processes(small_set, tmp_path):
    cs = read_folder(small_set)
    in_process = build(cs, cache_dir=tmp_path / "a")
    workers = build(cs, cache_dir=tmp_path / "b", num_workers=2)
    assert same_features(workers, in_process)


def test_a_cpu_build_computes_features_in_its_workers_one_thread_each(small_set, tmp_path, monkeypatch):
    """Each worker decodes and featurises its own clips (so the build scales with cores); the main process
    only writes. Workers are forked, so the patched forward runs there and reports through a file."""
    import os

    cs = read_folder(small_set)
    calls = tmp_path / "calls.txt"
    real = store_module.LogMel.forward

    def logged(self, w):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()} {torch.get_num_threads()}\n")
        return real(self, w)

    monkeypatch.setattr(store_module.LogMel, "forward", logged)
    build(cs, cache_dir=tmp_path / "w", num_workers=2, batch_size=4)
    rows = [line.split() for line in calls.read_text().splitlines()]
    assert len(rows) == 3  # 12 clips in tasks of 4
    assert all(pid != str(os.getpid()) and threads == "1" for pid, threads in rows)
    calls.unlink()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build(cs, cache_dir=tmp_path / "n", num_workers=0)
    finally:
        torch.set_num_threads(before)
    assert {tuple(line.split()) for line in calls.read_text().splitlines()} == {(str(os.getpid()), "2")}  # no workers: all threads here
