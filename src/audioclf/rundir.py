"""The run directory: the one folder a training writes, claimed for as long as the run lasts.

``claim(out, resume, overwrite)`` checks that ``out`` can become a run directory before any work starts,
locks it (``LOCK_FILE``, holding the pid) so that no second training writes into it, and refuses to mix a
new run with an earlier one: ``resume`` continues it, ``overwrite`` first removes its outputs
(``RunDir.outputs``, and the evaluations and exports of the old model) and nothing else.

``resumed_config`` decides which settings a resumed run may change (``RESUMABLE``); ``config_diff`` and
``RUN_ONLY`` also tell cross-validation whether a finished fold was trained by the same recipe.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .clips import LABEL_SEPARATOR
from .config import RunConfig
from .errors import AudioclfError
from .fileio import atomic_path, csv_cell, write_text_atomic
from .metrics import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

LOCK_FILE = ".audioclf.lock"
# what evaluate writes into its output folder (MODEL_DIR/eval by default)
EVAL_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png", "report.txt")
TAG_EVAL_FILES = ("metrics.json", "predictions.csv", "pr_curves.png", "report.txt")  # of a multilabel model or dataset
# the columns of metrics.csv: one row per epoch, train_one_epoch's and evaluate_split's floats
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "val_map", "epoch_s",
                 "clips_per_s"]


class RunDir:
    """The files of one run directory, by what they hold, and their writers: the one place their names are
    written. ``RunDir(out).best`` is ``out/best.pt``."""

    def __init__(self, path):
        self.path = p = Path(path)
        self.best = p / "best.pt"  # the best epoch's model: what inference reads
        self.last = p / "last.pt"  # everything --resume needs
        self.metrics = p / "metrics.csv"  # a row per epoch (METRIC_FIELDS)
        self.summary = p / "summary.json"  # what fit returns
        self.test_metrics = p / "test_metrics.json"  # the test fold's, as audioclf evaluate scores it
        self.test_predictions = p / "test_predictions.csv"
        self.config = p / "config.yaml"  # the resolved config, written before the first epoch
        self.labels = p / "labels.json"
        self.curves = p / "curves.png"
        self.skipped = p / "skipped.csv"  # clips the feature store could not read, and why
        self.log = p / "train.log"
        self.mlflow_run = p / "mlflow_run.json"  # with --logger mlflow: the MLflow run a --resume continues

    def outputs(self) -> list[Path]:
        """What a training writes here; --overwrite removes these (and earlier evaluations and exports of
        the old model) and nothing else."""
        return [self.best, self.last, self.metrics, self.summary, self.test_metrics, self.test_predictions,
                self.config, self.labels, self.curves, self.skipped, self.log, self.mlflow_run]

    def earlier_run(self) -> list[Path]:
        """The outputs of an earlier run worth keeping: a new run is refused without --resume or --overwrite."""
        return [p for p in (self.best, self.last, self.metrics, self.summary, self.test_metrics) if p.exists()]

    def write_config(self, config: RunConfig, classes: list[str]) -> None:
        config.save_yaml(self.config)
        write_text_atomic(self.labels, json.dumps(classes, indent=1))

    def write_metrics(self, rows: list[dict]) -> None:
        with atomic_path(self.metrics) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in METRIC_FIELDS} for r in rows)  # a run resumed from before val_map

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        with open(self.metrics) as f:
            return [{k: (int(v) if k == "epoch" else float(v or "nan")) for k, v in r.items()} for r in csv.DictReader(f)]

    def write_skipped(self, skipped: list[tuple[str, str]]) -> None:
        with open(self.skipped, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # names as on disk
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(skipped)
        if skipped:
            log.warning("%d clip(s) skipped, listed in %s", len(skipped), self.skipped)

    def write_test(self, metrics: dict, rows: Iterable[tuple[str, str, str, float]]) -> None:
        """The test fold's ``metrics`` (:func:`audioclf.metrics.classification_metrics`) and per-clip
        ``rows`` (see :func:`write_predictions`)."""
        write_predictions(self.test_predictions, rows)
        write_text_atomic(self.test_metrics, json.dumps(metrics, indent=2) + "\n")

    def write_test_tags(self, metrics: dict, paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                        labels: Sequence[str], thresholds: Optional[Sequence[float]]) -> None:
        """A multilabel test fold's ``metrics`` (:func:`audioclf.metrics.multilabel_metrics`) and per-clip
        probabilities (see :func:`write_tag_predictions`)."""
        write_tag_predictions(self.test_predictions, paths, y_true, probs, labels, thresholds)
        write_text_atomic(self.test_metrics, json.dumps(metrics, indent=2) + "\n")

    def finish(self, summary: dict) -> None:
        """What a run writes last: curves.png from metrics.csv, and summary.json."""
        plot_curves(self.metrics, self.curves)
        write_text_atomic(self.summary, json.dumps(summary, indent=1))

    @contextmanager
    def logging_to_file(self) -> Iterator[None]:
        """Copy the library's log to train.log while the block runs."""
        root = logging.getLogger("audioclf")
        self.path.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(self.log, encoding="utf-8", errors="backslashreplace")  # file names need not be UTF-8
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(h)
            h.close()

# settings that change where or how loudly a run goes, not what it learns
RUN_ONLY = {("train", "quiet"), ("train", "device"), ("train", "deterministic"), ("train", "logger"),
            ("data", "num_workers"), ("data", "cache_dir")}
# what --resume may change: the run-only settings, and how many epochs it lasts
RESUMABLE = RUN_ONLY | {("train", "epochs")}


@contextmanager
def claim(out: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Make ``out`` this run's directory for as long as the block runs.

    A run that fails before its first checkpoint removes the folders it made, so a bad data path or flag
    leaves no empty ``out`` behind.

    Raises:
        AudioclfError: when ``out`` cannot be a folder we write to, another training holds it, both
            ``resume`` and ``overwrite`` are given, or it holds an earlier run and neither is.
    """
    made = _first_missing(out)
    check_out_dir(out)
    try:
        with _lock(out):
            _clear_earlier_run(out, resume, overwrite)
            yield
    except BaseException:
        # a run that fails before its first checkpoint (bad data, no weights) has nothing to resume: the
        # folders it made go too, so the next attempt does not find an earlier run
        if made is not None and not RunDir(out).last.exists():
            shutil.rmtree(made, ignore_errors=True)
        raise


def _first_missing(out: Path) -> Optional[Path]:
    """The outermost folder of ``out`` that does not exist yet (``out`` itself, or one above it); None if
    ``out`` exists."""
    missing = None
    while not out.exists() and out != out.parent:
        missing, out = out, out.parent
    return missing


def check_out_dir(out: Path) -> None:
    """Refuse an --out that cannot become a run directory before any work starts."""
    if out.exists() and not out.is_dir():
        raise AudioclfError(f"--out {out} is a file; name a folder for the run")
    existing = out
    while not existing.exists():  # the nearest existing folder above: where the run directory will be made
        existing = existing.parent
    if not existing.is_dir():
        raise AudioclfError(f"--out {out} lies under {existing}, which is a file; name a folder for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AudioclfError(f"--out {out}: {existing} is not writable; name a folder you can write to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AudioclfError(f"--out {out}: cannot create the folder ({e.strerror})") from None


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (``LOCK_FILE``, with this pid) while the block runs.

    A second training into the same folder is refused with the first one's pid. The kernel drops the
    lock when its process dies, so a killed run leaves no stale lock behind.
    """
    import fcntl

    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AudioclfError(f"--out {out}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AudioclfError(f"{out} is in use by another training (pid {pid}); wait for it to finish "
                                f"or choose another --out") from None
        try:  # the holder before us may have removed the file between our open and our lock
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiting run then locks a fresh file
        os.close(fd)


def _clear_earlier_run(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run with an earlier one in ``out``; with ``overwrite``, remove the earlier outputs."""
    if resume and overwrite:
        raise AudioclfError(f"--resume continues the run in {out} and --overwrite replaces it: give one of them")
    earlier = RunDir(out).earlier_run()
    if resume or not earlier:
        return
    if not overwrite:
        raise AudioclfError(f"{out} holds an earlier run ({', '.join(p.name for p in earlier)}); continue it with "
                            f"--resume, replace it with --overwrite, or choose another --out")
    from .checkpoint import CONFIG_FILE, SAFETENSORS_FILE
    from .export import ONNX_FILE

    old = RunDir(out).outputs() + [out / "eval" / name for name in {*EVAL_FILES, *TAG_EVAL_FILES}]
    if (out / SAFETENSORS_FILE).exists() or (out / ONNX_FILE).exists():  # an export of the old model
        old += [out / SAFETENSORS_FILE, out / ONNX_FILE, out / CONFIG_FILE]
    removed = [p for p in old if p.is_file()]
    for p in removed:
        p.unlink()
    if (out / "eval").is_dir() and not any((out / "eval").iterdir()):
        (out / "eval").rmdir()
    log.info("--overwrite: removed %d file(s) of the earlier run in %s", len(removed), out)


def config_diff(was: dict, now: dict) -> list[tuple[str, str, object, object]]:
    """(section, key, value in ``was``, value in ``now``) of each setting that differs."""
    return [(sec, key, was[sec][key], val) for sec, d in now.items() if isinstance(d, dict)
            for key, val in d.items() if was[sec][key] != val]


def resumed_config(saved: RunConfig, requested: RunConfig, out: Path) -> RunConfig:
    """``saved`` (the config in last.pt) with the ``RESUMABLE`` settings of ``requested``; any other
    difference is refused, since the run would no longer continue as it started. A requested value that
    training resolves (lr None, pretrained "auto") matches what the saved run resolved it to."""
    def unresolved(sec, key, val):
        return (sec, key) in {("train", "lr"), ("model", "pretrained")} and val in (None, "auto")

    def same_path(a, b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    applied, refused = {}, []
    if requested.preset != saved.preset:
        refused.append(f"preset: {saved.preset!r} there, {requested.preset!r} now")
    for sec, key, old, new in config_diff(saved.to_dict(), requested.to_dict()):
        if unresolved(sec, key, new) or ((sec, key) == ("data", "root") and same_path(old, new)):
            continue
        if (sec, key) == ("train", "epochs") and saved.train.scheduler == "onecycle":
            refused.append(f"train.epochs: {old!r} there, {new!r} now (the onecycle schedule's length is fixed "
                           f"when a run starts)")
        elif (sec, key) in RESUMABLE:
            applied.setdefault(sec, {})[key] = new
            log.info("resume: %s.%s=%r (was %r)", sec, key, new, old)
        else:
            refused.append(f"{sec}.{key}: {old!r} there, {new!r} now")
    if refused:
        allowed = ", ".join(key for _, key in sorted(RESUMABLE))
        raise AudioclfError(f"--resume continues the run in {out} as it started, but {'; '.join(refused)}. Only "
                            f"{allowed} may change on resume; start a new run (another --out, or --overwrite) for the rest")
    return replace(saved, **{sec: replace(getattr(saved, sec), **kv) for sec, kv in applied.items()})


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



def write_tag_predictions(path, paths: Sequence[str], y_true: Optional[np.ndarray], probs: np.ndarray,
                          labels: Sequence[str], thresholds: Optional[Sequence[float]] = None) -> None:
    """Write multilabel predictions as CSV, atomically: ``path,true,predicted`` (class names joined by ``;``:
    the clip's classes, and those whose probability reaches their threshold), then one probability column
    per class, named by the class.

    Args:
        path: the CSV file.
        paths (sequence of str): the clips.
        y_true (np.ndarray, optional): ``(clips, classes)`` 0/1 targets; ``None`` leaves ``true`` empty.
        probs (np.ndarray): ``(clips, classes)`` probabilities.
        labels (sequence of str): the class names, in column order.
        thresholds (sequence of float, optional): per class. (Default: ``metrics.DEFAULT_THRESHOLD``)
    """
    probs = np.asarray(probs)
    on = probs >= (DEFAULT_THRESHOLD if thresholds is None else np.asarray(thresholds))
    names = np.asarray(labels, dtype=object)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "true", "predicted", *map(csv_cell, labels)])
        for k, clip in enumerate(paths):
            true = "" if y_true is None else LABEL_SEPARATOR.join(names[np.asarray(y_true[k]) > 0])
            w.writerow([csv_cell(clip), csv_cell(true), csv_cell(LABEL_SEPARATOR.join(names[on[k]])),
                        *(f"{p:.4f}" for p in probs[k])])


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """Loss, accuracy and learning rate by epoch, from metrics.csv, as a PNG. A bare ``Figure`` renders with
    Agg and leaves pyplot's state (a notebook's backend) alone."""
    from matplotlib.figure import Figure

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    col = {k: [float(r.get(k) or "nan") for r in rows] for k in METRIC_FIELDS[1:]}
    fig = Figure(figsize=(13, 3.8), layout="tight")
    axes = fig.subplots(1, 3)
    axes[0].plot(ep, col["train_loss"], label="train"), axes[0].plot(ep, col["val_loss"], label="validation")
    axes[0].set_title("loss"), axes[0].legend()
    axes[1].plot(ep, col["train_acc"], label="train"), axes[1].plot(ep, col["val_acc"], label="validation")
    axes[1].plot(ep, col["val_f1"], label="validation macro-F1", linestyle="--")
    axes[1].set_title("accuracy"), axes[1].set_ylim(0, 1.02), axes[1].legend()
    axes[2].plot(ep, col["lr"]), axes[2].set_title("learning rate")
    if min(col["lr"]) > 0:
        axes[2].set_yscale("log")
    for a in axes:
        a.set_xlabel("epoch"), a.grid(alpha=0.3)
    fig.savefig(out_png, dpi=100)
