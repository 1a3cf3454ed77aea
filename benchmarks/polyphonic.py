"""Polyphonic ESC-50: tagging mixtures of 2-3 sounds with a model trained on clips of one sound each.

    python benchmarks/polyphonic.py ESC-50/                      # mixtures of fold 4, both models, a table
    python benchmarks/polyphonic.py ESC-50/ --validation         # mixtures of the validation clips instead
    python benchmarks/polyphonic.py ESC-50/ --json

The mixtures (written once, as WAVs and a ``path,labels,levels_db`` CSV, under --out): --n 2-clip and --n 3-clip
mixtures of clips of distinct classes, 5 s, from ESC-50 fold 4 only, the fold both models hold out
(``--test-fold 4``). Levels are loudness differences, as a DCASE mixer sets an event's level against a
reference: each clip's loudness is the RMS of its active part (ESC-50 pads short sounds with silence), the
first clip is the reference, and every other clip is set to a level drawn from -6 to +6 dB relative to
it; ``levels_db`` holds each clip's level, in the order of ``labels``. With --validation they come from
the clips the runs validated on (the 20 % of folds 1-3 that ``split_clips`` holds out), so settings can
be chosen without looking at fold 4.

The models: mn04_as fine-tuned on ESC-50 folds 1-3 twice, once ``--task multilabel`` (sigmoids, with the
"mix" augmentation, attention pooling and frame targets, 60 epochs: the task's recipe) and once ``--task
multiclass`` (softmax), each trained by the command printed below when its run directory (--ml, --mc) holds no best.pt. Both are scored by ``audioclf
evaluate`` on the mixture CSV: mAP (over all mixtures, the 2-clip and the 3-clip ones), micro/macro F1 at
the multilabel model's thresholds (chosen on its validation clips) and at 0.5 for the softmax, where at
most one class can pass, and how often the class of a mixture's loudest and of its quietest clip ranks
among its top N classes (N clips).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from audioclf.audio import load_audio
from audioclf.checkpoint import load_checkpoint
from audioclf.config import DataConfig, RunConfig
from audioclf.data import load_clips, split_clips
from audioclf.evaluate import evaluate
from audioclf.metrics import mean_average_precision

SAMPLE_RATE = 32000  # Hz, mn04_as's
DURATION_S = 5.0
LEVEL_DB = 6.0  # each clip after the first is drawn from [-LEVEL_DB, +LEVEL_DB] dB relative to the first's loudness
TEST_FOLD = 4
WEIGHTS_FILE = "mn04_as_mAP_432.pt"


def active_rms(wave: np.ndarray, frame: int = 1024, floor_db: float = 40.0) -> float:
    """RMS over the frames within ``floor_db`` of the loudest: ESC-50 clips are padded with silence, which
    would make a short sound look quiet."""
    n = max(1, len(wave) // frame)
    power = (wave[:n * frame].reshape(n, frame) ** 2).mean(axis=1) if len(wave) >= frame else np.array([np.mean(wave ** 2)])
    active = power[power >= power.max() * 10 ** (-floor_db / 10)]
    return float(np.sqrt(active.mean())) if power.max() > 0 else 0.0


def make_mixtures(clips, classes: list[str], out: Path, n_per_size: int, seed: int) -> Path:
    """Write ``n_per_size`` mixtures of 2 and of 3 clips (distinct classes) to ``out`` and their CSV
    (``path,labels,levels_db``); an existing CSV made with the same parameters is reused."""
    params = {"clips": sorted(c.path for c in clips), "n": n_per_size, "seed": seed, "level_db": LEVEL_DB,
              "reference": "first clip", "sample_rate": SAMPLE_RATE, "duration_s": DURATION_S}
    manifest, stamp = out / "mixtures.csv", out / "mixtures.json"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return manifest
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for c in clips:
        by_class.setdefault(c.label, []).append(c)
    labels_of = sorted(by_class)
    n = int(SAMPLE_RATE * DURATION_S)
    rows = []
    for k, size in enumerate([2] * n_per_size + [3] * n_per_size):
        chosen = rng.choice(labels_of, size=size, replace=False)
        levels = np.concatenate([[0.0], rng.uniform(-LEVEL_DB, LEVEL_DB, size - 1)])
        mix = np.zeros(n, np.float32)
        for label, level in zip(chosen, levels):
            clip = by_class[label][int(rng.integers(len(by_class[label])))]
            wave = load_audio(clip.path, SAMPLE_RATE)[:n]
            wave = np.pad(wave, (0, n - len(wave)))
            mix += 0.05 / max(active_rms(wave), 1e-6) * 10 ** (level / 20) * wave
        mix /= max(1.0, float(np.abs(mix).max()) / 0.99)  # no clipping; levels relative to each other kept
        name = f"mix{k:04d}.wav"
        sf.write(out / name, mix, SAMPLE_RATE, subtype="FLOAT")
        rows.append((name, ";".join(classes[c] for c in chosen), ";".join(f"{v:.2f}" for v in levels)))
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "levels_db"])
        w.writerows(rows)
    stamp.write_text(json.dumps(params))
    return manifest


def train_command(data: Path, weights: Optional[Path], run: Path, task: str) -> list[str]:
    return [sys.executable, "-m", "audioclf", "train", str(data), "--format", "esc50", "--test-fold", str(TEST_FOLD),
            "--backbone", "mn04_as", "--task", task, "--quiet", "--out", str(run)] + \
        (["--weights", str(weights)] if weights else [])


def ensure_run(data: Path, weights: Optional[Path], run: Path, task: str) -> None:
    if (run / "best.pt").is_file():
        return
    cmd = train_command(data, weights, run, task)
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def breakdown(eval_dir: Path, manifest: Path) -> dict:
    """From evaluate's predictions.csv: the mAP of the 2-clip and of the 3-clip mixtures (``mAP_2``,
    ``mAP_3``), and how often the class of the loudest and of the quietest clip of a mixture ranks among
    its top N, N the number of clips (``loudest_found``, ``quietest_found``): the quiet sounds lost?"""
    with open(manifest, encoding="utf-8") as f:
        levels = {r["path"]: dict(zip(r["labels"].split(";"), map(float, r["levels_db"].split(";"))))
                  for r in csv.DictReader(f)}
    with open(eval_dir / "predictions.csv", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, classes = list(reader), reader.fieldnames[3:]  # path, true, predicted, then one column per class
    out, found = {}, {"loudest_found": [], "quietest_found": []}
    for r in rows:
        level = levels[Path(r["path"]).name]
        s = np.array([float(r[name]) for name in classes])
        top = {classes[i] for i in np.argsort(-s)[:len(level)]}
        found["loudest_found"].append(max(level, key=level.get) in top)
        found["quietest_found"].append(min(level, key=level.get) in top)
    for size in (2, 3):
        sub = [r for r in rows if len(r["true"].split(";")) == size]
        y = np.array([[name in r["true"].split(";") for name in classes] for r in sub])
        s = np.array([[float(r[name]) for name in classes] for r in sub])
        out[f"mAP_{size}"] = mean_average_precision(y, s)
    return out | {k: float(np.mean(v)) for k, v in found.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="the ESC-50 root (audio/, meta/esc50.csv)")
    p.add_argument("--weights", type=Path, help=f"local copy of {WEIGHTS_FILE} (default: beside the data, in "
                                                "DATA/../../weights/, else the torch hub cache or a download)")
    p.add_argument("--ml", type=Path, default=Path("runs/bench-ml"), help="the multilabel run (trained if it has "
                                                                          "no best.pt; default: %(default)s)")
    p.add_argument("--mc", type=Path, default=Path("runs/bench-mc"), help="the multiclass run (likewise; default: "
                                                                          "%(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/polyphonic"), help="mixtures and evaluations "
                                                                             "(default: %(default)s)")
    p.add_argument("--n", type=int, default=300, help="mixtures of each size, 2 and 3 clips (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixtures (default: %(default)s)")
    p.add_argument("--validation", action="store_true", help="mix the runs' validation clips, not fold 4")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    beside = args.data.resolve().parents[1] / "weights" / WEIGHTS_FILE  # a shared/data/esc50 root: shared/weights/
    args.weights = args.weights or (beside if beside.is_file() else None)

    for run, task in ((args.ml, "multilabel"), (args.mc, "multiclass")):
        ensure_run(args.data, args.weights, run, task)
    clipset = load_clips(DataConfig(root=str(args.data), format="esc50"))
    if args.validation:  # the split the multilabel run made, from its own seed and val_split
        c = RunConfig.from_saved(load_checkpoint(args.ml)["config"])
        clips = split_clips(clipset.clips, test_fold=TEST_FOLD, val_split=c.data.val_split, seed=c.train.seed,
                            classes=clipset.classes)["val"]
        where = args.out / "validation"
    else:
        clips = [c for c in clipset.clips if c.fold == TEST_FOLD]
        where = args.out / f"fold{TEST_FOLD}"
    manifest = make_mixtures(clips, clipset.classes, where / "mixtures", args.n, args.seed)

    results = {}
    for name, run in (("mn04_as multilabel + mix", args.ml), ("mn04_as multiclass, softmax", args.mc)):
        t0 = time.perf_counter()
        eval_dir = where / f"eval-{run.name}"
        m = evaluate(run, DataConfig(root=str(manifest), format="csv"), out_dir=eval_dir, quiet=True)
        results[name] = {"run": str(run), "mAP": m["mAP"], "micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"],
                         **breakdown(eval_dir, manifest), "n": m["n_clips"],
                         "eval_s": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"Polyphonic ESC-50 ({'validation clips of folds 1-3' if args.validation else f'fold {TEST_FOLD}'}): "
          f"{2 * args.n} mixtures of 2-3 clips, levels +-{LEVEL_DB:g} dB\n")
    print("| model | mAP | mAP, 2 clips | mAP, 3 clips | micro-F1 | macro-F1 | loudest in top N | quietest in top N |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mAP']:.3f} | {r['mAP_2']:.3f} | {r['mAP_3']:.3f} | {r['micro_f1']:.3f} | "
              f"{r['macro_f1']:.3f} | {r['loudest_found']:.3f} | {r['quietest_found']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
