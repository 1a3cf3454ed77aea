"""Evaluation: classify a labelled dataset with a trained model, then write metrics, per-clip predictions,
a confusion matrix plot and a text report.

Predictions come from :class:`audioclf.predict.Classifier`, the same path as ``audioclf predict``, so
feature settings come from the checkpoint only. Metrics are scikit-learn's.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .config import AudioclfError, DataConfig
from .data import load_clips
from .fileio import atomic_path, check_output, csv_cell
from .predict import load

log = logging.getLogger(__name__)

# what evaluate writes into its output folder (MODEL_DIR/eval by default)
EVAL_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png", "report.txt")


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Macro-averaged F1 over the classes that occur among the true labels or the predictions.

    audioclf's one macro-F1: training's validation and test figures and ``audioclf evaluate`` all use it.
    A class that is neither in the data nor predicted is left out (it would count 0 and say nothing about
    the model); a class predicted but absent from the data scores 0. scikit-learn's convention, with
    ``zero_division=0``.
    """
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    return float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, top-3 accuracy, per-class precision/recall/F1/support and the confusion matrix.

    Args:
        y_true (sequence of int): true class index of each clip, into ``labels``.
        probs (np.ndarray): ``(clips, len(labels))`` predicted probabilities.
        labels (sequence of str): the model's class names.

    Per-class figures, the confusion matrix and macro-F1 (:func:`macro_f1`) cover the classes that occur
    in ``y_true`` or among the predictions (scikit-learn's convention), listed under ``labels`` in matrix order.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, probs = np.asarray(y_true), np.asarray(probs)
    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    # sklearn's top_k_accuracy_score refuses 2-D scores for two classes and warns when k >= classes
    top3 = (np.argsort(-probs, axis=1)[:, :3] == y_true[:, None]).any(axis=1).mean()
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred),
        "top3_accuracy": float(top3),
        "n_clips": int(len(y_true)),
        "per_class": {labels[c]: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(present, precision, recall, f1, support)},
        "labels": [labels[c] for c in present],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=present).tolist(),
    }


def write_predictions(path, rows: Iterable[tuple[str, str, str, float]]) -> None:
    """Write per-clip predictions as CSV (``path,true,predicted,confidence,correct``), atomically.

    Args:
        path: the CSV file.
        rows (iterable): ``(clip path, true class name, predicted class name, confidence)``, the
            confidence being the predicted class's probability in [0, 1].
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "true", "predicted", "confidence", "correct"])
        w.writerows([csv_cell(clip), csv_cell(true), csv_cell(pred), f"{conf:.4f}", int(pred == true)]
                    for clip, true, pred, conf in rows)


def plot_confusion_matrix(cm, labels: Sequence[str], path) -> None:
    """Save a row-normalised confusion matrix (row = true class, so the diagonal is per-class recall) as
    a PNG. Figure and font scale with the number of classes, so 50 class names stay readable."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state

    cm = np.asarray(cm, dtype=float)
    n = len(labels)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(5.0, 0.32 * n + 3.0)  # inches
    font = min(10.0, max(8.0, 240 / n))  # points; a cell is about 23 pt, so the names fit their rows
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, normalised per true class ({int(cm.sum())} clips)")
    if n <= 20:  # beyond that the numbers no longer fit their cells
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=font,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, shrink=0.6)
    fig.savefig(path, dpi=120)


def _default_out_dir(model_path) -> Path:
    p = Path(model_path)
    return p / "eval" if p.is_dir() else p.with_name(f"{p.stem}-eval")


def evaluate(model_path, data: DataConfig, fold: Optional[int] = None, out_dir=None, device: str = "auto",
             batch_size: int = 32, quiet: bool = False) -> dict:
    """Evaluate a trained model on a labelled dataset.

    Args:
        model_path: run directory, ``.pt`` checkpoint or exported model folder.
        data (DataConfig): the dataset; its class names are matched to the model's by name.
        fold (int, optional): evaluate only the clips of this fold. (Default: all clips)
        out_dir (optional): where the outputs go. (Default: ``MODEL_DIR/eval``, or ``NAME-eval`` next
            to a checkpoint file)
        device (str, optional): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. (Default: ``"auto"``)
        batch_size (int, optional): windows per forward pass. (Default: ``32``)
        quiet (bool, optional): no progress bar. (Default: ``False``)

    Writes ``metrics.json``, ``predictions.csv``, ``confusion_matrix.png`` and ``report.txt`` to
    ``out_dir``. Unreadable clips are skipped and listed under ``skipped``.

    Returns:
        dict: the metrics of :func:`classification_metrics`, plus ``skipped`` (list of ``{"path",
        "reason"}``), ``out_dir`` and ``report`` (the text of ``report.txt``).

    Raises:
        AudioclfError: when the dataset has a class the model does not know, the fold has no clips,
            or no clip can be read.
    """
    out_dir = check_output(out_dir if out_dir else _default_out_dir(model_path), folder=True)
    clf = load(model_path, device, batch_size=batch_size)
    clipset = load_clips(data)
    unknown = [name for name in clipset.classes if name not in clf.labels]
    if unknown:
        raise AudioclfError(f"{data.root}: class(es) {', '.join(unknown)} are not among the model's classes; "
                            f"model classes: {', '.join(clf.labels)}; dataset classes: {', '.join(clipset.classes)}")
    clips = clipset.clips
    if fold is not None:
        folds = sorted({c.fold for c in clips if c.fold is not None})
        clips = [c for c in clips if c.fold == fold]
        if not clips:
            raise AudioclfError(f"fold={fold} has no clips; folds in this dataset: {folds or 'none (no fold column)'}")

    index = {name: i for i, name in enumerate(clf.labels)}
    skipped = [{"path": p, "reason": r} for p, r in clipset.skipped]
    rows, y_true, probs = [], [], []
    for clip, r in zip(clips, clf.classify_files([c.path for c in clips], quiet=quiet)):
        if r["error"]:
            log.warning("skipping clip: %s", r["error"])
            skipped.append({"path": clip.path, "reason": r["error"]})
            continue
        true = clipset.classes[clip.label]
        y_true.append(index[true])
        probs.append(r["probs"])
        rows.append((clip.path, true, r["label"], r["confidence"]))
    if not rows:
        raise AudioclfError(f"none of the {len(clips)} clips could be read; see the warnings above for each file's reason")

    metrics = classification_metrics(y_true, np.array(probs), clf.labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.update(skipped=skipped, out_dir=str(out_dir))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(out_dir / "predictions.csv", rows)
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"], out_dir / "confusion_matrix.png")
    metrics["report"] = _report(metrics, y_true, probs, clf.labels, model_path, data, fold)
    (out_dir / "report.txt").write_text(metrics["report"])
    log.info("evaluation written to %s", out_dir)
    return metrics


def _report(metrics: dict, y_true, probs, labels: list[str], model_path, data: DataConfig, fold) -> str:
    from sklearn.metrics import classification_report

    present = [labels.index(name) for name in metrics["labels"]]
    table = classification_report(y_true, np.argmax(probs, axis=1), labels=present, target_names=metrics["labels"],
                                  digits=4, zero_division=0)
    where = f"{data.root} ({data.format}{', fold ' + str(fold) if fold is not None else ''})"
    return (f"model: {model_path}\ndata: {where}\n"
            f"clips: {metrics['n_clips']} evaluated, {len(metrics['skipped'])} skipped\n"
            f"accuracy {metrics['accuracy']:.4f}   macro F1 {metrics['macro_f1']:.4f}   "
            f"top-3 accuracy {metrics['top3_accuracy']:.4f}\n\n{table}")
