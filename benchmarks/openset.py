"""Open-set ESC-50: how well a model trained on 40 classes says "unknown" to the other 10.

    python benchmarks/openset.py ESC-50/                        # 3 class splits x 4 test folds (CV)
    python benchmarks/openset.py ESC-50/ --test-folds 4         # one test fold per split: 6 trainings
    python benchmarks/openset.py ESC-50/ --test-folds 4 --json

For each class split (seeded, ``--splits``): 10 of the 50 classes are drawn as unknown and left out of
training; a model (``--backbone``, its recipe) trains on the 40 known classes of the folds other than the
test fold, with its validation clips drawn from them as ``audioclf train`` draws them. On the test fold,
its known clips against its unknown ones, each candidate score (:data:`CANDIDATES`) is measured: AUROC,
FPR at 95 % TPR (share of unknown clips kept when 95 % of the known are), the shares of known clips kept
and unknown clips rejected by its rule (threshold keeping 95 % of the validation clips), with the
closed-set accuracy and the calibration (ECE) of the known clips.

The score is chosen without the test fold: a second model per split and test fold trains on the training
folds alone, with 8 of its 40 known classes left out as pseudo-unknown, and is tested on one of those folds
(:func:`inner_fold`); the candidate with the best mean AUROC there is the choice (bold in the table). A run
already finished under --out, and its outputs (``openset_outputs.npz``), are reused, so one command trains
what is missing and an interrupted benchmark continues.
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
# the candidates: audioclf.trust's scores, knn at several k (knnK), and sums of two (each part standardised)
CANDIDATES = ("msp", "energy", "embedding", "knn1", "knn2", "knn3", "knn5", "knn10", "knn20", "mahalanobis",
              "energy+mahalanobis", "energy+knn1")
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


def candidate_rule(name: str, o: dict, temperature: float, keep_known: float):
    """The rule of candidate ``name`` (a score of ``audioclf.trust.SCORES`` or a sum of them, ``knnK`` for knn
    with k = K) fitted as training fits it: references from the training clips, threshold (and a sum's
    standardisation) on the validation clips."""
    from audioclf.trust import KNN_K, fit_rejector, reference_embeddings

    parts = name.split("+")
    k = next((int(p[3:]) for p in parts if p.startswith("knn")), KNN_K)
    kind = "+".join("knn" if p.startswith("knn") else p for p in parts)
    refs = reference_embeddings(kind, o["train_emb"], o["train_labels"], o["val_logits"].shape[1])
    return fit_rejector(kind, keep_known, o["val_logits"], o["val_emb"], refs, temperature, k)


def score_outputs(o: dict, keep_known: float = 0.95) -> dict:
    """Each candidate score's AUROC (known against unknown test clips), FPR at 95 % TPR, and the known kept /
    unknown rejected shares of its rule; the closed-set accuracy and the ECE of the known test clips before
    and after temperature scaling (``T`` fitted on the validation clips, as training fits it)."""
    from audioclf.trust import expected_calibration_error, fit_temperature, fpr_at_tpr, roc_auc, softmax

    temperature = fit_temperature(o["val_logits"], o["val_labels"])
    known, labels = o["test_labels"] >= 0, o["test_labels"]
    out = {"closed_acc": float((o["test_logits"][known].argmax(1) == labels[known]).mean()),
           "n_known": int(known.sum()), "n_unknown": int((~known).sum()), "temperature": temperature,
           "ece_before": expected_calibration_error(softmax(o["test_logits"][known]), labels[known]),
           "ece_after": expected_calibration_error(softmax(o["test_logits"][known], temperature), labels[known])}
    for name in CANDIDATES:
        rule = candidate_rule(name, o, temperature, keep_known)
        s = rule.score(o["test_logits"], o["test_emb"])  # higher = more like a known class
        kept = s >= rule.threshold
        out[name] = {"auroc": roc_auc(s[known], s[~known]), "fpr95": fpr_at_tpr(s[known], s[~known], 0.95),
                     "known_kept": float(kept[known].mean()), "unknown_rejected": float(1 - kept[~known].mean())}
    return out


def chosen(results: list[dict]) -> str:
    """The candidate with the best mean AUROC on the inner (selection) runs: never on a test fold."""
    return max(CANDIDATES, key=lambda name: np.mean([r["select"][name]["auroc"] for r in results]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("esc50", type=Path, help="ESC-50 folder: audio/, meta/esc50.csv")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2], help="class-split seeds (default: 0 1 2)")
    p.add_argument("--test-folds", type=int, nargs="+", default=[1, 2, 3, 4], help="test folds (default: all four)")
    p.add_argument("--n-unknown", type=int, default=N_UNKNOWN, help=f"unknown classes (default: {N_UNKNOWN} of 50)")
    p.add_argument("--backbone", default="mn04_as", choices=BACKBONE_NAMES)
    p.add_argument("--weights", help="the MobileNet's weights file (default: ../shared/weights beside the clone)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the backbone's recipe)")
    p.add_argument("--train-only", action="store_true", help="train what is missing, score nothing")
    p.add_argument("--out", type=Path, default=Path("runs/bench-openset"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    if not (args.esc50 / "meta" / "esc50.csv").is_file():
        p.error(f"{args.esc50}: no meta/esc50.csv; give the ESC-50 folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = read_meta(args.esc50)
    classes = sorted({r["category"] for r in rows})
    folds = sorted({int(r["fold"]) for r in rows})
    results = []
    for seed in args.splits:
        known, unknown = class_split(classes, seed, args.n_unknown)
        # the same share of the known classes plays unknown inside the training folds, where the score is chosen
        inner_known = class_split(known, seed, round(args.n_unknown * len(known) / len(classes)))[0]
        base = args.out / args.backbone / f"split{seed}"
        manifest = known_manifest(args.esc50, rows, known, base / "known.csv")
        for fold in args.test_folds:
            t0 = time.perf_counter()
            inner_rows = [r for r in rows if int(r["fold"]) != fold and r["category"] in known]
            select = train_run(known_manifest(args.esc50, inner_rows, inner_known, base / f"select{fold}.csv"),
                               base / f"select{fold}", inner_fold(fold, folds), args.backbone, args.weights, args.epochs)
            run = train_run(manifest, base / f"fold{fold}", fold, args.backbone, args.weights, args.epochs)
            if args.train_only:
                continue
            r = {"split": seed, "test_fold": fold, "unknown": unknown,
                 "select": score_outputs(run_outputs(select, args.esc50, inner_rows, inner_known, inner_fold(fold, folds))),
                 **score_outputs(run_outputs(run, args.esc50, rows, known, fold)), "wall_s": time.perf_counter() - t0}
            results.append(r)
            logging.info("split %d fold %d: %s", seed, fold, json.dumps(r))
    if args.train_only:
        return 0
    (args.out / args.backbone / "openset.json").write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps({"chosen": chosen(results), "runs": results}, indent=1))
        return 0
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """Markdown: one row per candidate score (means over the runs, ± the spread), the chosen one in bold; then
    one row per run with the chosen score."""
    best = chosen(results)

    def cell(key, name=None, runs=results, part=None):
        v = [(r[part] if part else r)[name][key] if name else (r[part] if part else r)[key] for r in runs]
        return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    lines = ["| score | AUROC, training folds (chooses) | AUROC | FPR at 95 % TPR | known kept | unknown rejected |",
             "|---|---|---|---|---|---|"]
    for name in CANDIDATES:
        shown = f"**{name}**" if name == best else name
        lines.append(f"| {shown} | {cell('auroc', name, part='select')} | {cell('auroc', name)} | {cell('fpr95', name)} "
                     f"| {cell('known_kept', name)} | {cell('unknown_rejected', name)} |")
    lines += ["", f"| split | test fold | AUROC ({best}) | FPR at 95 % TPR | closed-set accuracy | ECE before / after T |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['split']} | {r['test_fold']} | {r[best]['auroc']:.3f} | {r[best]['fpr95']:.3f} | "
                     f"{r['closed_acc']:.3f} | {r['ece_before']:.3f} / {r['ece_after']:.3f} |")
    lines.append(f"| mean | | {cell('auroc', best)} | {cell('fpr95', best)} | {cell('closed_acc')} | "
                 f"{cell('ece_before')} / {cell('ece_after')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
