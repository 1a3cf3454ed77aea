"""Open-set ESC-50: how well a model trained on 40 classes says "unknown" to the other 10.

    python benchmarks/openset.py ESC-50/                        # 3 class splits x 4 test folds (CV)
    python benchmarks/openset.py ESC-50/ --test-folds 4         # one test fold per split: 3 trainings
    python benchmarks/openset.py ESC-50/ --test-folds 4 --json

For each class split (seeded, ``--splits``): 10 of the 50 classes are drawn as unknown and left out of
training; a model (``--backbone``, its recipe) trains on the 40 known classes of the folds other than the
test fold, with its validation clips drawn from them as ``audioclf train`` draws them. Training fits the
model's temperature and rejection rule on those validation clips (``audioclf.trust``). On the test fold,
its known clips against its unknown ones, each rejection score is measured: AUROC, FPR at 95 % TPR (share
of unknown clips kept when 95 % of the known are), the share of unknown clips the saved rule (threshold at
``keep_known``) rejects, and the closed-set accuracy on the known clips. A run already finished under
--out is reused, so one command trains what is missing and an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from audioclf.backbones import BACKBONE_NAMES, BACKBONES
from audioclf.config import resolve
from audioclf.train import fit

N_UNKNOWN = 10
N_PSEUDO = 8  # known classes that play unknown inside the training folds, where the score is chosen
SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def class_split(classes: list[str], seed: int, n_unknown: int = N_UNKNOWN) -> tuple[list[str], list[str]]:
    """(known, unknown) class names: ``n_unknown`` drawn at random by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(classes))
    unknown = sorted(classes[i] for i in order[:n_unknown])
    return [c for c in classes if c not in unknown], unknown


def inner_fold(test_fold: int, folds) -> int:
    """The fold that plays test fold inside the training folds of ``test_fold`` (the last of the others)."""
    return max(f for f in folds if f != test_fold)


def read_meta(root: Path) -> list[dict]:
    with open(root / "meta" / "esc50.csv", newline="") as f:
        return list(csv.DictReader(f))


def known_manifest(root: Path, rows: list[dict], known: list[str], path: Path) -> Path:
    """A CSV manifest (``audioclf train --format csv``) of the known classes' clips (of ``rows``), folds and
    groups."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold", "group"])
        for r in rows:
            if r["category"] in known:
                w.writerow([str((root / "audio" / r["filename"]).resolve()), r["category"], r["fold"], r["src_file"]])
    return path


def train_run(manifest: Path, run: Path, test_fold: int, backbone: str, weights, epochs) -> Path:
    """Train on the manifest with ``test_fold`` held out, unless ``run`` already holds a finished run."""
    if (run / "summary.json").is_file():
        return run
    model = {"backbone": backbone}
    if backbone != "resnet18":
        local = Path(weights) if weights else SHARED_WEIGHTS / BACKBONES[backbone].weights_file
        model.update(pretrained="audioset", **({"weights_path": str(local)} if local.is_file() else {}))
    else:
        model.update(pretrained="none")
    train = {"quiet": True, **({"epochs": epochs} if epochs else {})}
    cfg = resolve("default", overrides={"data": {"root": str(manifest), "format": "csv", "test_fold": test_fold},
                                        "model": model, "train": train})
    fit(cfg, run, overwrite=True)
    return run


def run_outputs(run: Path, root: Path, rows: list[dict], known: list[str], test_fold: int) -> dict:
    """The run's logits and embeddings (``train_*``, ``val_*`` as training split its clips; ``test_*`` of the
    ``test_fold`` clips of ``rows``, labels -1 for those of a class not in ``known``), cached in the run dir."""
    cache = run / "openset_outputs.npz"
    if cache.is_file():
        return dict(np.load(cache))
    from audioclf.calibrate import run_outputs as split_outputs
    from audioclf.predict import load

    out = {}
    for split, arrays in split_outputs(run, device="cpu").items():
        if split != "test":
            out.update({f"{split}_{k}": a.numpy() for k, a in zip(("logits", "emb", "labels"), arrays)})
    clf = load(run, device="cpu", reject=False)
    test = [r for r in rows if int(r["fold"]) == test_fold]
    paths = [str(root / "audio" / r["filename"]) for r in test]
    out.update(test_logits=clf.logits(paths), test_emb=clf.embed(paths),
               test_labels=np.array([clf.labels.index(r["category"]) if r["category"] in known else -1 for r in test]))
    np.savez(cache, **out)
    return out


def score_run(run: Path, root: Path, rows: list[dict], known: list[str], test_fold: int) -> dict:
    """Each rejection score's AUROC, FPR at 95 % TPR, and the known kept / unknown rejected shares of its rule
    (fitted on the validation clips) on the test fold, with the closed-set accuracy and the ECE before and
    after temperature scaling of the known clips. The run's rule is left as its config says."""
    from audioclf.calibrate import calibrate_run
    from audioclf.predict import load
    from audioclf.trust import SCORES, expected_calibration_error, fpr_at_tpr, read_trust, roc_auc, softmax

    clf = load(run, device="cpu", reject=False)
    test = [r for r in rows if int(r["fold"]) == test_fold]
    paths = [str(root / "audio" / r["filename"]) for r in test]
    is_known = np.array([r["category"] in known for r in test])
    logits, emb = clf.logits(paths), clf.embed(paths)
    labels = np.array([clf.labels.index(r["category"]) if k else -1 for r, k in zip(test, is_known)])
    acc = float((logits[is_known].argmax(1) == labels[is_known]).mean())
    out = {"closed_acc": acc, "n_known": int(is_known.sum()), "n_unknown": int((~is_known).sum())}
    default = clf.config.train.reject_score
    for name in [*(k for k in SCORES if k != default), default]:  # the run keeps its own rule, fitted last
        temperature, rule = read_trust(calibrate_run(run, refit=True, score=name))
        s = rule.score(logits, emb)  # higher = more like a known class
        kept = s >= rule.threshold
        out[name] = {"auroc": roc_auc(s[is_known], s[~is_known]), "fpr95": fpr_at_tpr(s[is_known], s[~is_known], 0.95),
                     "known_kept": float(kept[is_known].mean()), "unknown_rejected": float(1 - kept[~is_known].mean())}
    k_logits, k_labels = logits[is_known], labels[is_known]
    out.update(temperature=temperature, ece_before=expected_calibration_error(softmax(k_logits), k_labels),
               ece_after=expected_calibration_error(softmax(k_logits, temperature), k_labels))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("esc50", type=Path, help="ESC-50 folder: audio/, meta/esc50.csv")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2], help="class-split seeds (default: 0 1 2)")
    p.add_argument("--test-folds", type=int, nargs="+", default=[1, 2, 3, 4], help="test folds (default: all four)")
    p.add_argument("--backbone", default="mn04_as", choices=BACKBONE_NAMES)
    p.add_argument("--weights", help="the MobileNet's weights file (default: ../shared/weights beside the clone)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the backbone's recipe)")
    p.add_argument("--train-only", action="store_true", help="train what is missing, score nothing")
    p.add_argument("--out", type=Path, default=Path("runs/bench-openset"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if not (args.esc50 / "meta" / "esc50.csv").is_file():
        p.error(f"{args.esc50}: no meta/esc50.csv; give the ESC-50 folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = read_meta(args.esc50)
    classes = sorted({r["category"] for r in rows})
    folds = sorted({int(r["fold"]) for r in rows})
    results = []
    for seed in args.splits:
        known, unknown = class_split(classes, seed)
        base = args.out / args.backbone / f"split{seed}"
        manifest = known_manifest(args.esc50, rows, known, base / "known.csv")
        for fold in args.test_folds:
            t0 = time.perf_counter()
            # the score is chosen on a model of the training folds alone, N_PSEUDO of its known classes unknown
            inner_rows = [r for r in rows if int(r["fold"]) != fold]
            inner_known = class_split(known, seed, N_PSEUDO)[0]
            select = train_run(known_manifest(args.esc50, inner_rows, inner_known, base / f"select{fold}.csv"),
                               base / f"select{fold}", inner_fold(fold, folds), args.backbone, args.weights, args.epochs)
            run = train_run(manifest, base / f"fold{fold}", fold, args.backbone, args.weights, args.epochs)
            if args.train_only:
                continue
            r = {"split": seed, "test_fold": fold, "unknown": unknown,
                 **score_run(run, args.esc50, rows, known, fold), "wall_s": time.perf_counter() - t0}
            results.append(r)
            logging.info("split %d fold %d: %s", seed, fold, json.dumps(r))
    if args.train_only:
        return 0
    (args.out / args.backbone / "openset.json").write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """A Markdown table: one row per score, means over the runs (split x fold) with the spread of the splits."""
    from audioclf.trust import SCORES

    def cell(key, name=None):
        v = [r[name][key] if name else r[key] for r in results]
        return f"{np.mean(v):.3f} ± {np.std(v):.3f}"

    lines = ["| score | AUROC | FPR at 95 % TPR | known kept | unknown rejected | closed-set accuracy |",
             "|---|---|---|---|---|---|"]
    for name in SCORES:
        lines.append(f"| {name} | {cell('auroc', name)} | {cell('fpr95', name)} | {cell('known_kept', name)} "
                     f"| {cell('unknown_rejected', name)} | {cell('closed_acc')} |")
    lines.append(f"\nECE of the known test clips (15 bins): {cell('ece_before')} before temperature scaling, "
                 f"{cell('ece_after')} after; {len(results)} runs (mean ± std)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
