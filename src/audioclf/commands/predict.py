"""``audioclf predict``: which files to classify (folders, lists of paths, stdin; no URLs), checks on
``--out`` before the model loads, and the CSV, JSON and ``ID,Class`` submission writers. Inference itself
is :meth:`audioclf.predict.Classifier.classify_files`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..audio import AUDIO_EXTENSIONS, find_audio_files
from ..config import AudioclfError
from ..fileio import atomic_path
from ..predict import load

log = logging.getLogger(__name__)

# "http://...", "s3://...": a scheme, then "//"
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STDIN = ("-", "/dev/stdin")


def _refuse_url(arg: str, where: str = "") -> None:
    if URL.match(arg):
        raise AudioclfError(f"{arg}{where}: URLs are not supported; download the file and pass its path")


def collect_paths(paths: Sequence) -> list[Path]:
    """Expand PATH arguments: a folder gives its audio files (recursive, sorted), a ``.txt`` file the paths
    it lists (one a line, relative to the list's folder; blank lines and ``#`` comments skipped), anything
    else is taken as an audio file (a missing one is reported when it is read). URLs are refused."""
    out = []
    for arg in paths:
        _refuse_url(str(arg))  # before Path(), which would fold "//" into "/"
        p = Path(arg)
        listed = [p]
        if p.suffix.lower() == ".txt" and not p.is_dir():
            try:
                lines = p.read_text(encoding="utf-8-sig").splitlines()
            except OSError as e:
                raise AudioclfError(f"{p}: cannot read the list of paths ({e.strerror})") from None
            listed = []
            for i, line in enumerate(map(str.strip, lines), 1):
                if line and not line.startswith("#"):
                    _refuse_url(line, f" (line {i} of {p})")
                    listed.append(p.parent / line)
        for q in listed:
            if not q.is_dir():
                out.append(q)
                continue
            found = find_audio_files(q)
            if not found:
                log.warning("%s: folder holds no audio files (%s)", q, ", ".join(AUDIO_EXTENSIONS))
            out += found
    if not out:
        raise AudioclfError(f"no audio files to classify in {', '.join(map(str, paths))}")
    return out


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any model work."""
    if out.is_dir():
        raise AudioclfError(f"--out {out} is a folder; name a .csv or .json file")
    folder = out.parent
    if not folder.is_dir():
        raise AudioclfError(f"--out {out}: the folder {folder} does not exist"
                            + (" (it is a file)" if folder.exists() else ""))
    if not os.access(folder, os.W_OK):
        raise AudioclfError(f"--out {out}: the folder {folder} is not writable")


def _check_not_an_input(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``--out`` that is one of the inputs: writing it would destroy that input."""
    target = out.resolve()
    for p in inputs:
        if p.resolve() == target or (out.exists() and p.exists() and os.path.samefile(p, out)):
            raise AudioclfError(f"--out {out} is also an input ({p}): writing it would destroy that input; "
                                f"choose another file")


def _read_stdin(folder: Path) -> Path:
    """``predict -``: the audio piped in, saved to a file in ``folder`` (the decoders need to seek)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise AudioclfError("'-' reads audio from stdin, but stdin is a terminal: pipe a file in "
                            "(audioclf predict MODEL - < clip.wav)")
    path = folder / "stdin"
    path.write_bytes(sys.stdin.buffer.read())
    return path


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (surrogate-escaped by Python)
    become ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _write_csv(f, results: Iterable[dict], timeline: bool) -> None:
    fields = ["path", "label", "confidence", "top_k", "error"] + (["start_s", "end_s"] if timeline else [])
    w = csv.DictWriter(f, fields, restval="", lineterminator="\n")
    w.writeheader()
    for r in results:
        if r["error"]:
            w.writerow({"path": r["path"], "error": r["error"]})
            continue
        w.writerow({"path": r["path"], "label": r["label"], "confidence": f"{r['confidence']:.4f}",
                    "top_k": ";".join(f"{t['label']}:{t['prob']:.4f}" for t in r["top_k"])})
        for win in r.get("windows", ()):
            w.writerow({"path": r["path"], "label": win["label"], "confidence": f"{win['confidence']:.4f}",
                        "start_s": f"{win['start_s']:.3f}", "end_s": f"{win['end_s']:.3f}"})


def _write_submission(f, results: Iterable[dict]) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["ID", "Class"])
    for r in results:  # a failed file keeps its row, with no class, so the IDs stay complete
        w.writerow([Path(r["path"]).name, r.get("label", "")])


def _write_json(f, results: Iterable[dict], labels: list[str]) -> None:
    items = []
    for r in results:
        item = {"path": r["path"], "label": r.get("label"), "confidence": r.get("confidence"),
                "probs": dict(zip(labels, r["probs"])) if "probs" in r else None,
                "top_k": r.get("top_k"), "duration_s": r.get("duration_s"), "error": r["error"]}
        if "windows" in r:
            item["windows"] = r["windows"]
        items.append(item)
    json.dump(items, f, indent=2)
    f.write("\n")


def run_predict(model, paths: Sequence[str], *, out: Optional[str] = None, top_k: int = 3, batch_size: int = 32,
                device: str = "auto", window_s: Optional[float] = None, hop_s: Optional[float] = None,
                timeline: bool = False, submission: bool = False, quiet: bool = False) -> int:
    """``audioclf predict``: classify every path and write CSV (default, to stdout without ``out``), JSON
    (``out`` ending in ``.json``) or an ``ID,Class`` submission.

    Args:
        model (str or Path): run directory, ``.pt`` checkpoint or exported safetensors folder.
        paths (list of str): audio files, folders (recursive), ``.txt`` files listing paths, or ``-`` (or
            ``/dev/stdin``) for one file read from stdin.
        out (str, optional): the ``.csv`` or ``.json`` file to write. (Default: CSV on stdout)
        top_k, batch_size, device, window_s, hop_s, timeline: as in :meth:`Classifier.classify_files`
            and :func:`audioclf.predict.load`; ``window_s`` and ``hop_s`` in seconds.
        submission (bool, optional): write ``ID,Class`` rows. (Default: ``False``)
        quiet (bool, optional): no progress bar. (Default: ``False``)

    Returns:
        int: the exit code: 1 when every file failed, else 0 (failures are rows with an ``error``).

    Raises:
        AudioclfError: for options, inputs or an ``out`` that cannot work, before the model loads.
    """
    out_path = Path(out) if out else None
    kind = out_path.suffix.lower() if out_path else ".csv"
    if kind not in (".csv", ".json"):
        raise AudioclfError(f"Unsupported --out {out_path}: name a .csv or .json file")
    if submission and kind == ".json":
        raise AudioclfError("--submission writes CSV: give --out NAME.csv, or no --out for stdout")
    if out_path:
        _check_out(out_path)
    if sum(a in STDIN for a in paths) > 1:
        raise AudioclfError("stdin ('-' or /dev/stdin) can be read once: name it once")
    with tempfile.TemporaryDirectory(prefix="audioclf-stdin-") as tmp:
        given = [str(_read_stdin(Path(tmp))) if a in STDIN else a for a in paths]
        shown = {g: a for g, a in zip(given, paths) if a in STDIN}  # the temp file is "-" in the output
        files = collect_paths(given)
        if out_path:
            _check_not_an_input(out_path, [*map(Path, paths), *files])
        clf = load(model, device, batch_size=batch_size)
        results = clf.classify_files(files, window_s=window_s, hop_s=hop_s, timeline=timeline, top_k=top_k,
                                     quiet=quiet)
        failed = _write_results(results, out_path, "submission" if submission else kind, clf.labels, timeline,
                                shown)
    log.info("%d file(s) classified, %d failed%s", len(files) - failed, failed,
             f"; wrote {out_path}" if out_path else "")
    return 1 if failed == len(files) else 0


def _write_results(results: Iterable[dict], out: Optional[Path], kind: str, labels: list[str], timeline: bool,
                   shown: dict) -> int:
    """Write ``results`` as they come to ``out`` (atomically; stdout when ``None``) in ``kind`` (``.csv``,
    ``.json`` or ``submission``), with printable names (``shown`` renames the stdin temp file). Returns how
    many files failed."""
    failed, escaped = 0, 0

    def logged(results):
        nonlocal failed, escaped
        for r in results:
            raw = r["path"]
            name = shown.get(raw, raw)
            r["path"] = _printable(name)
            escaped += r["path"] != name
            if r["error"]:
                r["error"] = _printable(r["error"].replace(raw, name))
                log.warning("%s", r["error"])
                failed += 1
            yield r

    with atomic_path(out) if out else nullcontext() as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") if out else nullcontext(sys.stdout) as f:
            if kind == "submission":
                _write_submission(f, logged(results))
            elif kind == ".json":
                _write_json(f, logged(results), labels)
            else:
                _write_csv(f, logged(results), timeline)
    if escaped:
        log.warning("%d file name(s) are not valid UTF-8: written with \\xNN escapes for the bytes that are not", escaped)
    return failed
