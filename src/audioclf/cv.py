"""Cross-validation: ``cross_validate(config, out_dir)`` trains one model per test fold with ``train.fit``.

Each fold in turn is the test fold; the model trains on the others, with early stopping on a group-aware
validation split carved from the training folds (never the test fold). A dataset without folds gets
stratified, group-aware ones (``data.write_folds``), written to ``OUT/folds.csv``. Each fold is a run
directory ``OUT/fold<k>``; a finished one is reused when its recipe matches, so an interrupted CV
continues where it stopped. The folds' test metrics are those of ``audioclf evaluate``; the summary is
their mean and standard deviation, and the confusion matrix summed over folds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from .config import RunConfig
from .data import load_clips, write_folds
from .errors import AudioclfError
from .evaluate import plot_confusion_matrix
from .fileio import write_text_atomic
from .rundir import RUN_ONLY, RunDir, check_out_dir, config_diff
from .train import fit

log = logging.getLogger(__name__)

_FOLD_FIELDS = ("fold", "test_acc", "test_f1", "test_n", "epochs_run", "best_epoch", "train_s", "pretrained")


def cross_validate(config: RunConfig, out_dir, folds: Optional[list[int]] = None, n_folds: int = 5) -> dict:
    """k-fold cross-validation of the recipe ``config``.

    Args:
        config (RunConfig): the recipe; its ``data.test_fold`` and ``data.val_fold`` are set per fold.
        out_dir: the CV folder: ``fold<k>/`` run directories, ``cv_summary.json``, ``cv_summary.md``,
            ``confusion_matrix.png`` (summed over folds) and, for a dataset without folds, ``folds.csv``.
        folds (list of int, optional): the test folds to run. (Default: every fold of the dataset)
        n_folds (int, optional): how many folds to make for a dataset without them. (Default: ``5``)

    Returns:
        dict: per-fold results (``folds``), ``accuracy_mean``/``_std``, ``macro_f1_mean``/``_std``,
        ``labels``, ``confusion_matrix`` (summed, over ``labels``), ``recipe`` and ``table`` (markdown).
    """
    out = Path(out_dir)
    check_out_dir(out)
    config, classes, all_folds = _with_folds(config, out, n_folds)
    folds = folds or all_folds
    bad = [k for k in folds if k not in all_folds]
    if bad or len(all_folds) < 2:
        raise AudioclfError(f"cv needs at least 2 folds and test folds among {all_folds}; got {bad or all_folds}")
    results = []
    for i, k in enumerate(folds, 1):
        log.info("=== fold %d/%d: test fold %d ===", i, len(folds), k)
        results.append(_run_fold(config, out / f"fold{k}", k, classes))
    summary = _summarise(results, classes, config)
    write_text_atomic(out / "cv_summary.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "cv_summary.md", summary["table"] + "\n")
    plot_confusion_matrix(np.array(summary["confusion_matrix"]), classes, out / "confusion_matrix.png")
    log.info("cross-validation: accuracy %.4f ± %.4f, macro-F1 %.4f ± %.4f over %d folds", summary["accuracy_mean"],
             summary["accuracy_std"], summary["macro_f1_mean"], summary["macro_f1_std"], len(results))
    return summary


def _with_folds(config: RunConfig, out: Path, n_folds: int) -> tuple[RunConfig, list[str], list[int]]:
    """(config, class names, fold numbers): a dataset without folds is replaced by ``OUT/folds.csv``."""
    clipset = load_clips(config.data)
    if any(c.fold is None for c in clipset.clips):
        manifest = write_folds(clipset, out / "folds.csv", n_folds, config.train.seed)
        config = replace(config, data=replace(config.data, root=str(manifest), format="csv", esc10=False))
        clipset = load_clips(config.data)
    return config, clipset.classes, sorted({c.fold for c in clipset.clips})


def _run_fold(config: RunConfig, run: Path, k: int, classes: list[str]) -> dict:
    """Train (or reuse) the run with test fold ``k``: its summary, with ``fold`` and its confusion matrix
    over all ``classes``."""
    fold_config = replace(config, data=replace(config.data, test_fold=k, val_fold=None))
    files = RunDir(run)
    if files.summary.is_file() and files.test_metrics.is_file():
        s = json.loads(files.summary.read_text())
        _check_same_recipe(s.get("requested_config"), fold_config, run)
        log.info("fold %d already done (%s); reusing it", k, files.summary)
    else:
        t0 = time.perf_counter()
        s = fit(fold_config, run, overwrite=True)  # an unfinished fold starts again, as it always has
        s["train_s"] = time.perf_counter() - t0
        s["requested_config"] = fold_config.to_dict()
        write_text_atomic(files.summary, json.dumps(s, indent=1))
    s["fold"] = k
    s["confusion_matrix"] = _full_confusion_matrix(json.loads(files.test_metrics.read_text()), classes)
    return s


def _full_confusion_matrix(metrics: dict, classes: list[str]) -> list[list[int]]:
    """The confusion matrix of ``metrics`` (over its ``labels``, the classes present in the fold) placed
    in a matrix over all ``classes``, so that folds with different classes present add up."""
    where = [classes.index(name) for name in metrics["labels"]]
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    cm[np.ix_(where, where)] = metrics["confusion_matrix"]
    return cm.tolist()


def _summarise(results: list[dict], classes: list[str], config: RunConfig) -> dict:
    acc = np.array([r["test_acc"] for r in results])
    f1 = np.array([r["test_f1"] for r in results])
    std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
    cm = np.sum([r["confusion_matrix"] for r in results], axis=0)
    lines = ["| fold | accuracy | macro-F1 | clips | epochs | train s |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['fold']} | {r['test_acc']:.4f} | {r['test_f1']:.4f} | {r.get('test_n', '')} | {r.get('epochs_run', '')} | "
              f"{r.get('train_s', float('nan')):.0f} |" for r in results]
    lines.append(f"| mean ± std | {acc.mean():.4f} ± {std(acc):.4f} | {f1.mean():.4f} ± {std(f1):.4f} | {int(cm.sum())} | | |")
    return {
        "folds": [{k: r.get(k) for k in _FOLD_FIELDS} for r in results],
        "accuracy_mean": float(acc.mean()), "accuracy_std": std(acc),
        "macro_f1_mean": float(f1.mean()), "macro_f1_std": std(f1),
        "labels": classes, "confusion_matrix": cm.tolist(),
        "recipe": f"{config.model.backbone} " + ("pretrained" if results[0].get("pretrained") else "from scratch"),
        "table": "\n".join(lines),
    }


def _check_same_recipe(saved: Optional[dict], config: RunConfig, run: Path) -> None:
    """Refuse to reuse a finished fold that was trained with other settings than ``config``."""
    if saved is None:
        log.warning("%s predates recipe records: reusing it without checking its settings", run)
        return
    now, saved = config.to_dict(), RunConfig.from_saved(saved).to_dict()  # settings added since: as before them
    diff = [f"{sec}.{key}: {old!r} there, {new!r} now" for sec, key, old, new in config_diff(saved, now)
            if (sec, key) not in RUN_ONLY]
    if diff:
        raise AudioclfError(f"{run} is a finished fold of a different recipe ({'; '.join(diff[:4])}); "
                            f"use another --out, or delete {run} to retrain it")
