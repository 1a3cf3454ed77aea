"""Evaluation: classify a labelled dataset with a trained model, then write metrics, per-clip predictions,
a confusion matrix plot and a text report.

Predictions come from :class:`audioclf.predict.Classifier`, the same path as ``audioclf predict``, so
feature settings come from the checkpoint only. Metrics are scikit-learn's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import DataConfig
from .data import load_clips
from .errors import AudioclfError
from .fileio import check_output
from .metrics import classification_metrics, multilabel_metrics, per_class_table, plot_pr_curves
from .options import PredictOptions
from .predict import load
from .rundir import EVAL_FILES, TAG_EVAL_FILES, write_predictions, write_tag_predictions
from .trust import ece_floor, expected_calibration_error, plot_reliability, softmax

log = logging.getLogger(__name__)

RELIABILITY_PNG = "reliability.png"


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


def evaluate(model_path, data: DataConfig, fold: Optional[int] = None, out_dir=None,
             device: str = PredictOptions.device, batch_size: int = PredictOptions.batch_size, quiet: bool = False) -> dict:
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

    Writes ``metrics.json``, ``predictions.csv``, ``confusion_matrix.png``, ``reliability.png`` and
    ``report.txt`` to ``out_dir``. The model's probabilities are its calibrated ones; ``ece_uncalibrated`` is
    their ECE before temperature scaling. Every clip gets one of the model's classes: the unknown rule is off
    here. A multilabel model, or a multilabel dataset (a manifest with a ``labels`` column: a multiclass model
    is then scored with its softmax probabilities), is scored as tags instead
    (:func:`audioclf.metrics.multilabel_metrics` at the model's thresholds): ``metrics.json`` with ``mAP``,
    ``micro_f1``, ``macro_f1`` and per-class AP; ``predictions.csv`` with one probability column per class
    (:func:`write_tag_predictions`); ``pr_curves.png``; ``report.txt`` with the per-class table. Unreadable
    clips are skipped and listed under ``skipped``.

    Returns:
        dict: the metrics of :func:`classification_metrics` plus ``ece``, ``ece_uncalibrated`` (15 bins) and
        ``temperature`` (or :func:`multilabel_metrics`), plus ``skipped`` (list of ``{"path", "reason"}``),
        ``out_dir`` and ``report`` (the text of ``report.txt``).

    Raises:
        AudioclfError: when the dataset has a class the model does not know, the fold has no clips,
            or no clip can be read.
    """
    out_dir = check_output(out_dir if out_dir else _default_out_dir(model_path), folder=True)
    clf = load(model_path, device, batch_size=batch_size, reject=False)
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
    if clf.multilabel or clipset.multilabel:
        return _evaluate_tags(clf, clipset, clips, skipped, out_dir, quiet, f"model: {model_path}\ndata: "
                              f"{_where(data, fold)}\n")
    rows, y_true, probs = [], [], []
    for clip, r in _classified(clf, clips, skipped, quiet):
        true = clipset.classes[clip.label]
        y_true.append(index[true])
        probs.append(r["probs"])
        rows.append((clip.path, true, r["label"], r["confidence"]))

    metrics = classification_metrics(y_true, np.array(probs), clf.labels)
    # softmax(T * log p) undoes the temperature exactly for a one-window clip (log p = logits / T + const)
    uncalibrated = softmax(clf.temperature * np.log(np.clip(probs, 1e-30, None)))
    metrics.update(ece=expected_calibration_error(probs, y_true), ece_uncalibrated=expected_calibration_error(
        uncalibrated, y_true), temperature=clf.temperature, **ece_floor(probs))
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.update(skipped=skipped, out_dir=str(out_dir))
    metrics_json, predictions_csv, matrix_png, report_txt = (out_dir / name for name in EVAL_FILES)
    metrics_json.write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(predictions_csv, rows)
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"], matrix_png)
    plot_reliability({"before temperature scaling": uncalibrated, f"after (T = {clf.temperature:.2f})": probs}, y_true,
                     out_dir / RELIABILITY_PNG)
    metrics["report"] = _report(metrics, y_true, probs, clf.labels, model_path, data, fold)
    report_txt.write_text(metrics["report"])
    log.info("evaluation written to %s", out_dir)
    return metrics


def _classified(clf, clips: list, skipped: list[dict], quiet: bool) -> list[tuple]:
    """``(clip, classify result)`` of each clip that could be read; the others join ``skipped``, with a warning."""
    done = []
    for clip, r in zip(clips, clf.classify_files([c.path for c in clips], quiet=quiet)):
        if r["error"]:
            log.warning("skipping clip: %s", r["error"])
            skipped.append({"path": clip.path, "reason": r["error"]})
        else:
            done.append((clip, r))
    if not done:
        raise AudioclfError(f"none of the {len(clips)} clips could be read; see the warnings above for each file's reason")
    return done


def _evaluate_tags(clf, clipset, clips: list, skipped: list[dict], out_dir: Path, quiet: bool, header: str) -> dict:
    """:func:`evaluate` of tags: every class of a clip (several, one or none) against the model's probabilities."""
    index = {name: i for i, name in enumerate(clf.labels)}
    done = _classified(clf, clips, skipped, quiet)
    y_true = np.zeros((len(done), len(clf.labels)), dtype=int)
    for k, (clip, _) in enumerate(done):
        y_true[k, [index[clipset.classes[t]] for t in clip.targets]] = 1
    probs = np.array([r["probs"] for _, r in done])
    metrics = multilabel_metrics(y_true, probs, clf.labels, clf.thresholds)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.update(task=clf.config.train.task, skipped=skipped, out_dir=str(out_dir))
    metrics_json, predictions_csv, pr_png, report_txt = (out_dir / name for name in TAG_EVAL_FILES)
    metrics_json.write_text(json.dumps(metrics, indent=2) + "\n")
    write_tag_predictions(predictions_csv, [c.path for c, _ in done], y_true, probs, clf.labels, clf.thresholds)
    plot_pr_curves(y_true, probs, clf.labels, pr_png)
    scored = "" if clf.multilabel else " (a multiclass model: its softmax probabilities)"
    metrics["report"] = (f"{header}clips: {metrics['n_clips']} evaluated, {len(skipped)} skipped{scored}\n"
                         f"mAP {metrics['mAP']:.4f}   micro F1 {metrics['micro_f1']:.4f}   macro F1 "
                         f"{metrics['macro_f1']:.4f}   subset accuracy {metrics['subset_accuracy']:.4f}\n\n"
                         + per_class_table(metrics))
    report_txt.write_text(metrics["report"])
    log.info("evaluation written to %s", out_dir)
    return metrics


def _where(data: DataConfig, fold) -> str:
    return f"{data.root} ({data.format}{', fold ' + str(fold) if fold is not None else ''})"


def _report(metrics: dict, y_true, probs, labels: list[str], model_path, data: DataConfig, fold) -> str:
    from sklearn.metrics import classification_report

    present = [labels.index(name) for name in metrics["labels"]]
    table = classification_report(y_true, np.argmax(probs, axis=1), labels=present, target_names=metrics["labels"],
                                  digits=4, zero_division=0)
    return (f"model: {model_path}\ndata: {_where(data, fold)}\n"
            f"clips: {metrics['n_clips']} evaluated, {len(metrics['skipped'])} skipped\n"
            f"accuracy {metrics['accuracy']:.4f}   macro F1 {metrics['macro_f1']:.4f}   "
            f"top-3 accuracy {metrics['top3_accuracy']:.4f}\n"
            f"ECE (15 bins) {metrics['ece']:.4f}, before temperature scaling {metrics['ece_uncalibrated']:.4f} "
            f"(T = {metrics['temperature']:.3f}); a perfectly calibrated model would measure {metrics['ece_floor']:.4f} "
            f"on these clips (95 % of the time below {metrics['ece_floor_p95']:.4f})\n\n{table}")
