"""The run directory: the one folder a training writes, claimed for as long as the run lasts.

``claim(out, resume, overwrite)`` checks that ``out`` can become a run directory before any work starts,
locks it (``LOCK_FILE``, holding the pid) so that no second training writes into it, and refuses to mix a
new run with an earlier one: ``resume`` continues it, ``overwrite`` first removes its outputs (``RUN_FILES``,
and the evaluations and exports of the old model) and nothing else.

``resumed_config`` decides which settings a resumed run may change (``RESUMABLE``); ``config_diff`` and
``RUN_ONLY`` also tell cross-validation whether a finished fold was trained by the same recipe.
"""

from __future__ import annotations

import csv
import logging
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

from .config import RunConfig
from .errors import AudioclfError
from .fileio import atomic_path

log = logging.getLogger(__name__)

LOCK_FILE = ".audioclf.lock"
# what a training writes into its run directory; --overwrite removes these (and earlier evaluations and
# exports of the old model) and nothing else
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "summary.json", "test_metrics.json", "test_predictions.csv",
             "config.yaml", "labels.json", "curves.png", "skipped.csv", "train.log", "mlflow_run.json")
# what evaluate writes into its output folder (MODEL_DIR/eval by default)
EVAL_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png", "report.txt")
_EARLIER_RUN = ("best.pt", "last.pt", "metrics.csv", "summary.json", "test_metrics.json")  # worth keeping

# settings that change where or how loudly a run goes, not what it learns
RUN_ONLY = {("train", "quiet"), ("train", "device"), ("train", "deterministic"), ("train", "logger"),
            ("data", "num_workers"), ("data", "cache_dir")}
# what --resume may change: the run-only settings, and how many epochs it lasts
RESUMABLE = RUN_ONLY | {("train", "epochs")}


@contextmanager
def claim(out: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Make ``out`` this run's directory for as long as the block runs.

    Raises:
        AudioclfError: when ``out`` cannot be a folder we write to, another training holds it, both
            ``resume`` and ``overwrite`` are given, or it holds an earlier run and neither is.
    """
    check_out_dir(out)
    with _lock(out):
        _clear_earlier_run(out, resume, overwrite)
        yield


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
    earlier = [name for name in _EARLIER_RUN if (out / name).exists()]
    if resume or not earlier:
        return
    if not overwrite:
        raise AudioclfError(f"{out} holds an earlier run ({', '.join(earlier)}); continue it with --resume, "
                            f"replace it with --overwrite, or choose another --out")
    from .checkpoint import CONFIG_FILE, SAFETENSORS_FILE
    from .export import ONNX_FILE

    old = [out / name for name in RUN_FILES] + [out / "eval" / name for name in EVAL_FILES]
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
        w.writerows([clip, true, pred, f"{conf:.4f}", int(pred == true)] for clip, true, pred, conf in rows)
