"""The accuracy benchmark's recipes and FSDD protocol (what they run, not how fast)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from audioclf.config import PRESETS, RunConfig, resolve
from audioclf.data import load_clips, split_clips

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    """The module of ``benchmarks/NAME.py`` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def accuracy():
    return bench("accuracy")


def test_every_recipe_resolves_and_differs_from_the_default_as_named(accuracy):
    default = resolve("default", overrides={"model": {"backbone": "resnet18"}})  # the recipes are resnet18 ablations
    for name, (preset, overrides) in accuracy.ESC10_RECIPES.items():
        cfg = resolve(preset, overrides=overrides)
        assert isinstance(cfg, RunConfig) and preset in PRESETS
        if name == "default":
            assert cfg == default
    assert resolve("default", overrides=accuracy.ESC10_RECIPES["no-peak"][1]).features.peak_normalize is False
    assert resolve("default", overrides=accuracy.ESC10_RECIPES["mixup"][1]).augment.mixup_alpha > 0
    v0 = resolve("default", overrides=accuracy.ESC10_RECIPES["v0"][1])
    assert (v0.features.peak_normalize, v0.augment.time_shift, v0.train.patience) == (False, 0.0, 10)
    assert resolve("default", overrides=accuracy.FSDD_RECIPES["freq-shift"]).augment.freq_shift == 2


def test_fsdd_manifest_holds_out_whole_speakers(accuracy, write_wav, tmp_path):
    wave = np.sin(np.linspace(0, 200, 4000)) * 0.3
    for speaker in accuracy.FSDD_SPEAKERS:
        for digit in range(10):
            for take in range(2):
                write_wav(wave, 8000, name=f"fsdd/recordings/{digit}_{speaker}_{take}.wav")
    manifest = accuracy.fsdd_manifest(tmp_path / "fsdd", tmp_path / "m.csv")
    clips = load_clips(resolve(overrides={"data": {"root": str(manifest), "format": "csv"}}).data)
    assert len(clips.clips) == 120 and clips.classes == [str(d) for d in range(10)]
    george = accuracy.FSDD_SPEAKERS.index("george") + 1
    splits = split_clips(clips.clips, test_fold=george, val_split=0.2, seed=0)
    assert {Path(c.path).stem.split("_")[1] for c in splits["test"]} == {"george"}
    trained_on = {Path(c.path).stem.split("_")[1] for c in splits["train"] + splits["val"]}
    assert trained_on == set(accuracy.FSDD_SPEAKERS) - {"george"}
    assert len(splits["val"]) == 20  # 20 % of the five other speakers' clips


def test_mobilenet_recipes_resolve_on_the_mobilenet_front_end(accuracy):
    for name, overrides in accuracy.MN_RECIPES.items():
        cfg = resolve("default", overrides={**overrides, "model": accuracy.backbone_overrides("mn04_as", None)})
        assert cfg.model.backbone == "mn04_as" and cfg.features.mel_scale == "kaldi"
    assert resolve("default", overrides=accuracy.MN_RECIPES["e30"]).train.epochs == 30


@pytest.mark.slow
def test_scale_benchmark_measures_every_part(tmp_path):
    """``benchmarks/scale.py --quick``: tiny sizes, each part run once, its JSON complete and plausible."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    (row,) = r["rss"]
    assert row["clips"] == 300 and 0 < row["store_mb"] < row["peak_rss_mb_store"]
    assert row["peak_rss_mb_memory"] > 0 and row["data_ms_store"] > 0 and row["data_ms_memory"] > 0
    assert 0 < r["share_store"] < 1 and 0 < r["share_memory"] < 1 and r["step_ms"] > 0
    assert r["extract_clips_per_s_1"] > 0 and r["extract_scaling"] > 0
    assert not list(tmp_path.glob("audioclf-scale-*"))  # its temporary stores and clips are gone


@pytest.fixture(scope="module")
def openset():
    return bench("openset")


def fake_esc50(root: Path, n_classes: int = 12, per_class: int = 8) -> Path:
    """An ESC-50 layout (audio/, meta/esc50.csv) of synthetic 1-s clips, folds 1-4, one src_file per clip."""
    import csv

    import soundfile as sf
    from audioclf.demo import SYNTH_CLASSES, synth_clip

    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = []
    for c in range(n_classes):
        for i in range(per_class):
            name = f"{i % 4 + 1}-{c}{i}-A-{c}.wav"
            wave = np.roll(synth_clip(SYNTH_CLASSES[c % 5], rng, 16000, 1.0), 1000 * c) * (0.3 + 0.1 * (c // 5))
            sf.write(root / "audio" / name, wave, 16000)
            rows.append({"filename": name, "fold": i % 4 + 1, "target": c, "category": f"class{c:02d}",
                         "esc10": "False", "src_file": f"{c}{i}", "take": "A"})
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_openset_splits_are_seeded_and_the_manifest_holds_the_known_classes_only(openset, tmp_path):
    classes = [f"c{i:02d}" for i in range(50)]
    known, unknown = openset.class_split(classes, 0)
    assert len(unknown) == 10 and len(known) == 40 and not set(known) & set(unknown)
    assert openset.class_split(classes, 0) == (known, unknown) and openset.class_split(classes, 1)[1] != unknown
    root = fake_esc50(tmp_path / "esc")
    rows = openset.read_meta(root)
    known = [f"class{c:02d}" for c in range(6)]
    clips = load_clips(resolve(overrides={"data": {"root": str(openset.known_manifest(root, rows, known, tmp_path / "k.csv")),
                                                   "format": "csv"}}).data)
    assert clips.classes == known and len(clips.clips) == 6 * 8
    assert {c.fold for c in clips.clips} == {1, 2, 3, 4} and all(c.group for c in clips.clips)


@pytest.mark.slow
def test_openset_benchmark_trains_scores_and_reuses_its_runs(openset, tmp_path, capsys):
    root = fake_esc50(tmp_path / "esc", per_class=12)  # 3 clips per class and fold
    argv = [str(root), "--backbone", "resnet18", "--epochs", "2", "--test-folds", "4", "--splits", "0",
            "--n-unknown", "4", "--out", str(tmp_path / "out"), "--json"]
    assert openset.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = out["runs"]
    assert r["n_known"] == 8 * 3 and r["n_unknown"] == 4 * 3  # fold 4 of 12 classes: 8 known, 4 unknown
    # the choice is made on a model of folds 1-3 alone (fold 3 its test fold), 3 of the 8 known classes unknown
    assert r["select"]["n_known"] == 5 * 3 and r["select"]["n_unknown"] == 3 * 3
    assert out["chosen"] == max(openset.CANDIDATES, key=lambda name: r["select"][name]["auroc"])
    for name in openset.CANDIDATES:
        assert 0 <= r[name]["auroc"] <= 1 and 0 <= r[name]["fpr95"] <= 1 and 0 <= r[name]["known_kept"] <= 1
    assert 0 <= r["ece_after"] <= 1
    assert f"**{out['chosen']}**" in openset.table([r])
    run = tmp_path / "out" / "resnet18" / "split0"
    written = [(run / name / "summary.json").stat().st_mtime_ns for name in ("fold4", "select4")]
    assert openset.main(argv) == 0
    # the finished runs are reused, not trained again
    assert [(run / name / "summary.json").stat().st_mtime_ns for name in ("fold4", "select4")] == written


def test_polyphonic_mixtures_hold_two_or_three_distinct_classes(write_wav, tmp_path):
    import csv

    import soundfile as sf

    from audioclf.clips import Clip

    poly = bench("polyphonic")
    rng = np.random.default_rng(0)
    clips = [Clip(str(write_wav((rng.standard_normal(16000) * 0.1 * (k + 1)).astype(np.float32), 16000,
                                name=f"c{label}_{k}.wav")), label, 4) for label in range(5) for k in range(2)]
    names = [f"class{i}" for i in range(5)]
    manifest = poly.make_mixtures(clips, names, tmp_path / "mix", n_per_size=4, seed=1)
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    assert [len(r["labels"].split(";")) for r in rows] == [2] * 4 + [3] * 4
    assert all(len(set(r["labels"].split(";"))) == len(r["labels"].split(";")) for r in rows)  # distinct classes
    wave, sr = sf.read(tmp_path / "mix" / rows[0]["path"])
    assert sr == poly.SAMPLE_RATE and len(wave) == int(poly.SAMPLE_RATE * poly.DURATION_S) and np.abs(wave).max() <= 1
    stamp = manifest.stat().st_mtime_ns
    assert poly.make_mixtures(clips, names, tmp_path / "mix", n_per_size=4, seed=1).stat().st_mtime_ns == stamp  # reused
    # levels are differences of loudness from the first clip, within +-6 dB, whatever the recorded levels:
    # one tone per class, recorded 0 to 36 dB apart and padded with silence, each read back from the mixture
    sr, n = poly.SAMPLE_RATE, int(poly.SAMPLE_RATE * poly.DURATION_S)
    freqs = [440.0 * (k + 1) for k in range(5)]
    tones = []
    for k, f in enumerate(freqs):
        wave = np.zeros(n, np.float32)
        wave[:n // (k + 1)] = 0.5 * 10 ** (-9 * k / 20) * np.sin(2 * np.pi * f * np.arange(n // (k + 1)) / sr)
        tones.append(Clip(str(write_wav(wave, sr, name=f"tone{k}.wav")), k, 4))
    manifest = poly.make_mixtures(tones, names, tmp_path / "tones", n_per_size=10, seed=2)
    t = np.arange(n) / sr
    with open(manifest) as f:
        for r in csv.DictReader(f):
            mixed, _ = sf.read(tmp_path / "tones" / r["path"])
            levels = [float(v) for v in r["levels_db"].split(";")]
            assert levels[0] == 0 and all(abs(v) <= poly.LEVEL_DB for v in levels)
            heard = []
            for name in r["labels"].split(";"):
                k = names.index(name)
                active = slice(0, n // (k + 1))  # the tone's RMS over its own active part
                heard.append(20 * np.log10(np.sqrt(2) * np.abs(np.mean(mixed[active] * np.exp(-2j * np.pi * freqs[k] * t[active])))))
            assert np.allclose(np.array(heard) - heard[0], levels, atol=0.2), (r, heard)
    # the loudness of a clip is that of its active part, whatever silence pads it
    burst = np.concatenate([np.zeros(30 * 1024), np.ones(2048) * 0.5, np.zeros(30 * 1024)])  # on the frame grid
    assert poly.active_rms(burst) == pytest.approx(0.5, rel=0.05)


def test_soundscapes_tune_on_training_folds_only_and_events_span_their_active_part(tmp_path):
    pytest.importorskip("sed_eval")
    spec = importlib.util.spec_from_file_location("bench_soundscapes", ROOT / "benchmarks" / "soundscapes.py")
    scapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scapes)
    (tmp_path / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"] + [f"{f}-{k}-A-0.wav,{f},0,dog,False,{k},A"
                                                                   for f in range(1, 5) for k in range(3)]
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    tuning, test = scapes.tuning_and_test_clips(tmp_path)
    # nothing is chosen on the test fold: the tuning scenes come from folds 1-3 only
    assert {c["fold"] for c in tuning} == {"1", "2", "3"} and {c["fold"] for c in test} == {"4"}
    # an event's reference extent is its clip's active part, not the silence around it
    sr = scapes.SR
    clip = np.concatenate([np.zeros(sr), 0.5 * np.sin(np.arange(2 * sr) * 0.3), 1e-4 * np.ones(2 * sr)])
    a, b = scapes.active_part(clip)
    assert a == pytest.approx(sr, abs=0.05 * sr) and b == pytest.approx(3 * sr, abs=0.05 * sr)
