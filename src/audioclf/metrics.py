"""Classification metrics: audioclf's one macro-F1, the figures ``audioclf evaluate`` reports, and the
multilabel ones.

A leaf module (numpy, and scikit-learn inside the functions), so that training's validation and test
figures and ``audioclf evaluate`` score alike without training importing the inference path. Multilabel
figures follow DCASE and AudioSet practice: average precision per class (the area under its
precision-recall curve, threshold-free) and its macro mean, mAP; F1 at per-class decision thresholds,
micro (every clip-class decision pooled) and macro (the mean of the classes' F1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5  # a class's decision threshold until one is chosen on validation clips


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


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of each class, ``(classes,)``; NaN for a class without a positive clip, where
    precision is undefined.

    Args:
        y_true (np.ndarray): ``(clips, classes)`` 0/1 (or bool) targets.
        scores (np.ndarray): ``(clips, classes)`` probabilities (any monotonic score).
    """
    from sklearn.metrics import average_precision_score

    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    return np.array([average_precision_score(y_true[:, c], scores[:, c]) if y_true[:, c].any() else np.nan
                     for c in range(y_true.shape[1])])


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """mAP: the mean of :func:`average_precision` over the classes that have a positive clip."""
    ap = average_precision(y_true, scores)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def best_thresholds(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class decision thresholds that maximise each class's F1 on these clips (validation), ``(classes,)``.

    A threshold lies halfway between the lowest score kept and the highest one left out, so it does not
    sit on a validation clip's score. A class without a positive clip keeps :data:`DEFAULT_THRESHOLD`.
    """
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    out = np.full(y_true.shape[1], DEFAULT_THRESHOLD)
    for c in range(y_true.shape[1]):
        positives = int(y_true[:, c].sum())
        if positives == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s, hits = scores[order, c], np.cumsum(y_true[order, c])
        kept = np.arange(1, len(s) + 1)
        f1 = 2 * hits / (kept + positives)  # F1 when the k highest scores are called positive
        f1[:-1][s[:-1] == s[1:]] = -1  # a threshold cannot split tied scores
        k = int(np.argmax(f1))
        out[c] = (s[k] + s[k + 1]) / 2 if k + 1 < len(s) else s[k] / 2
    return out


def tags_above(probs: np.ndarray, labels: Sequence[str], thresholds: Optional[Sequence[float]] = None) -> list[dict]:
    """The classes whose probability in ``probs`` (``labels`` order) reaches their threshold
    (:data:`DEFAULT_THRESHOLD` where none are given), as ``{"label", "prob"}``, most probable first."""
    thresholds = np.full(len(labels), DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds)
    return [{"label": labels[i], "prob": float(probs[i])} for i in np.argsort(-probs, kind="stable")
            if probs[i] >= thresholds[i]]


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, labels: Sequence[str],
                       thresholds: Optional[Sequence[float]] = None) -> dict:
    """mAP, micro- and macro-F1, per-class AP, F1, precision, recall, support and threshold.

    Args:
        y_true (np.ndarray): ``(clips, len(labels))`` 0/1 targets; a clip may hold several classes or none.
        scores (np.ndarray): ``(clips, len(labels))`` probabilities.
        labels (sequence of str): the class names, in column order.
        thresholds (sequence of float, optional): a class is predicted when its probability reaches its
            threshold. (Default: :data:`DEFAULT_THRESHOLD` for every class)

    Macro-F1 covers the classes present among the targets or the predictions (scikit-learn's convention);
    mAP the classes with a positive clip.
    """
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    y_true, scores = np.asarray(y_true).astype(int), np.asarray(scores, dtype=np.float64)
    thresholds = np.full(len(labels), DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds, dtype=float)
    y_pred = (scores >= thresholds).astype(int)
    present = [c for c in range(len(labels)) if y_true[:, c].any() or y_pred[:, c].any()]
    ap = average_precision(y_true, scores)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    micro = f1_score(y_true, y_pred, average="micro", zero_division=0)
    return {
        "mAP": mean_average_precision(y_true, scores),
        "micro_f1": float(micro),
        "macro_f1": float(np.mean(f1[present])) if present else 0.0,
        "subset_accuracy": float((y_pred == y_true).all(axis=1).mean()),  # every class of the clip right
        "n_clips": int(len(y_true)),
        "per_class": {labels[c]: {"ap": None if np.isnan(ap[c]) else float(ap[c]), "f1": float(f1[c]),
                                  "precision": float(precision[c]), "recall": float(recall[c]),
                                  "support": int(support[c]), "threshold": float(thresholds[c])}
                      for c in range(len(labels))},
    }


def per_class_table(metrics: dict) -> str:
    """:func:`multilabel_metrics`' per-class figures as a text table, best AP first."""
    rows = sorted(metrics["per_class"].items(), key=lambda kv: 1 if kv[1]["ap"] is None else -kv[1]["ap"])  # no AP: last
    width = max([5] + [len(name) for name, _ in rows])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'F1':>6}  {'prec':>6}  {'recall':>6}  {'thresh':>6}  {'support':>7}"]
    for name, m in rows:
        ap = "     -" if m["ap"] is None else f"{m['ap']:6.4f}"
        lines.append(f"{name:<{width}}  {ap}  {m['f1']:6.4f}  {m['precision']:6.4f}  {m['recall']:6.4f}  "
                     f"{m['threshold']:6.3f}  {m['support']:7d}")
    return "\n".join(lines) + "\n"


def plot_pr_curves(y_true: np.ndarray, scores: np.ndarray, labels: Sequence[str], path, *, most: int = 10):
    """Save the precision-recall curves as a PNG: the micro-averaged curve (every clip-class decision
    pooled) and those of the ``most`` classes with the lowest AP (the ones worth a look), each with its AP
    in the legend. Returns the matplotlib ``Figure``."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no pyplot state
    from sklearn.metrics import precision_recall_curve

    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    ap = average_precision(y_true, scores)
    fig = Figure(figsize=(7.5, 6), layout="constrained")
    ax = fig.subplots()
    if y_true.any():
        p, r, _ = precision_recall_curve(y_true.ravel(), scores.ravel())
        ax.plot(r, p, color="black", linewidth=2.2,
                label=f"micro-average (AP {average_precision(y_true.reshape(-1, 1), scores.reshape(-1, 1))[0]:.3f})")
    for c in [c for c in np.argsort(ap) if np.isfinite(ap[c])][:most]:
        p, r, _ = precision_recall_curve(y_true[:, c], scores[:, c])
        ax.plot(r, p, linewidth=1, label=f"{labels[c]} (AP {ap[c]:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall: mAP {mean_average_precision(y_true, scores):.3f} over "
                 f"{int(np.isfinite(ap).sum())} classes; the {min(most, int(np.isfinite(ap).sum()))} lowest AP shown")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    return fig
