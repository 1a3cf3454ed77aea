"""Classification metrics: audioclf's one macro-F1 and the figures ``audioclf evaluate`` reports.

A leaf module (numpy, and scikit-learn inside the functions), so that training's validation and test
figures and ``audioclf evaluate`` score alike without training importing the inference path.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
