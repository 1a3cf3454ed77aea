"""``audioclf predict``: which files to classify (folders, lists of paths, stdin; no URLs), checks on
``--out`` before the model loads, writing the results as they come (the tables and their columns are
:mod:`audioclf.commands.tables`), and ``--out DIR``: resumable prediction, shared among the processes of
``torchrun`` (their part files are :mod:`audioclf.commands.parts`). Inference itself is
:meth:`audioclf.predict.Classifier.classify_files`.

With ``--timeline`` the windows go to a table of their own: ``x.timeline.csv`` beside ``--out x.csv`` (or
``.parquet``), ``DIR/timeline.csv`` beside ``DIR/predictions.csv``; on stdout it replaces the per-file table.
JSON nests each file's windows in its result.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from ..audio import AUDIO_EXTENSIONS, find_audio_files
from ..errors import AudioclfError
from ..fileio import atomic_path, check_output, require_pyarrow
from ..options import PredictOptions
from ..predict import load
from ..runtime import barrier, broadcast, dist_info, process_group, resolve_device
from .parts import PARTS, PartWriter, new_run_id, part_fields, part_path, read_parts
from .tables import (TIMELINE_FIELDS, TableWriter, summary_fields, summary_row, timeline_rows, write_csv_rows, write_json,
                     write_parquet_rows, write_submission)

log = logging.getLogger(__name__)

# "http://...", "s3://...": a scheme, then "//"
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STDIN = ("-", "/dev/stdin")
FILE_KINDS = (".csv", ".json", ".parquet")  # --out suffixes that name one file; other names are folders
FORMATS = {"csv": ("csv",), "parquet": ("parquet",), "both": ("csv", "parquet")}  # --out-format, for --out DIR
OPTIONS = "options.json"  # in --out DIR: the options its parts were made with
TABLES = ("predictions", "timeline")  # in --out DIR: the per-file table and the timeline, .csv and/or .parquet
WINDOW_FIELDS = ["start_s", "end_s", "prob"]  # a part's columns after the per-file table's, with --timeline


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
        raise AudioclfError(f"--out {out} is a folder; name a .csv, .json or .parquet file, or a folder without a "
                            f"suffix for --out DIR")
    check_output(out)


def _read_stdin(folder: Path) -> Path:
    """``predict -``: the audio piped in, saved to a file in ``folder`` (the decoders need to seek)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise AudioclfError("'-' reads audio from stdin, but stdin is a terminal: pipe a file in "
                            "(audioclf predict MODEL - < clip.wav)")
    path = folder / "stdin"
    path.write_bytes(sys.stdin.buffer.read())
    return path


# a backslash that an escape could be mistaken for: before a backslash, an undecodable byte, or "xNN"
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=[\\\udc80-\udcff]|x[0-9A-Fa-f]{2})")


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (surrogate-escaped by Python)
    become ``\\xNN``, and a backslash that could be read as part of such an escape is doubled, so that two
    names never print alike (``a<byte ff>`` is ``a\\xff``, a name spelt ``a\\xff`` is ``a\\\\xff``)."""
    text = _AMBIGUOUS_BACKSLASH.sub(r"\\\\", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def timeline_path(out: Path) -> Path:
    """Where ``--timeline`` writes the windows beside ``--out x.csv``: ``x.timeline.csv`` (``.parquet`` alike)."""
    return out.with_name(f"{out.stem}.timeline{out.suffix}")


def run_predict(model, paths: Sequence[str], *, out: Optional[str] = None, top_k: int = PredictOptions.top_k,
                batch_size: int = PredictOptions.batch_size, device: str = PredictOptions.device,
                window_s: Optional[float] = None, hop_s: Optional[float] = None, timeline: bool = False,
                probs: bool = False, submission: bool = False, out_format: Optional[str] = None,
                retry_errors: bool = False, quiet: bool = False, reject: bool = PredictOptions.reject) -> int:
    """``audioclf predict``: classify every path and write CSV (default, to stdout without ``out``), JSON or
    Parquet (``out`` ending in ``.json`` or ``.parquet``), an ``ID,Class`` submission, or, with ``out`` a
    folder, resumable parts merged into ``out/predictions.csv`` (:func:`predict_to_folder`). The columns
    are :mod:`audioclf.commands.tables`'.

    Args:
        model (str or Path): run directory, ``.pt`` checkpoint or exported safetensors folder.
        paths (list of str): audio files, folders (recursive), ``.txt`` files listing paths, or ``-`` (or
            ``/dev/stdin``) for one file read from stdin.
        out (str, optional): the ``.csv``, ``.json`` or ``.parquet`` file to write, or a folder: an existing
            one, or a new name without a suffix. (Default: CSV on stdout)
        top_k, batch_size, device, window_s, hop_s, timeline: as in :meth:`Classifier.classify_files`
            and :func:`audioclf.predict.load`; ``window_s`` and ``hop_s`` in seconds. The timeline is a
            table of its own: ``x.timeline.csv`` beside ``out`` ``x.csv``; on stdout, the only table.
        probs (bool, optional): one probability column per class, ``p_<class>``. (Default: ``False``)
        submission (bool, optional): write ``ID,Class`` rows. (Default: ``False``)
        out_format, retry_errors: for a folder ``out`` only; see :func:`predict_to_folder`.
        quiet (bool, optional): no progress bar. (Default: ``False``)
        reject (bool, optional): label ``unknown`` what the model's rule rejects. (Default: ``True``)

    Returns:
        int: the exit code: 1 when every file failed, else 0 (failures are rows with an ``error``).

    Raises:
        AudioclfError: for options, inputs or an ``out`` that cannot work, before the model loads.
    """
    out_path = Path(out) if out else None
    options = dict(top_k=top_k, batch_size=batch_size, device=device, window_s=window_s, hop_s=hop_s,
                   timeline=timeline, probs=probs, quiet=quiet, reject=reject)
    if out_path and _is_folder(out_path):
        if submission:
            raise AudioclfError(f"--submission writes one CSV file: give --out NAME.csv, not the folder {out_path}")
        return predict_to_folder(model, paths, out_path, out_format=out_format, retry_errors=retry_errors, **options)
    world = dist_info()[2]
    if world > 1:
        raise AudioclfError(f"under torchrun ({world} processes) every process would write "
                            f"{out_path or 'stdout'}: give --out DIR, a folder, where each process writes its own "
                            f"part and rank 0 merges them into DIR/predictions.csv")
    if out_format is not None or retry_errors:
        raise AudioclfError(f"--out-format and --retry-errors are for --out DIR (a folder); --out {out_path or '(stdout)'} "
                            f"is one file, whose suffix chooses its format")
    kind = out_path.suffix.lower() if out_path else ".csv"
    if kind not in FILE_KINDS:
        raise AudioclfError(f"Unsupported --out {out_path}: name a .csv, .json or .parquet file, or a folder (an "
                            f"existing one, or a new name without a suffix)")
    if submission and kind != ".csv":
        raise AudioclfError("--submission writes CSV: give --out NAME.csv, or no --out for stdout")
    if kind == ".parquet":
        require_pyarrow()
    if out_path:
        _check_out(out_path)
        if timeline and kind != ".json" and not submission:
            _check_out(timeline_path(out_path))
    if sum(a in STDIN for a in paths) > 1:
        raise AudioclfError("stdin ('-' or /dev/stdin) can be read once: name it once")
    with tempfile.TemporaryDirectory(prefix="audioclf-stdin-") as tmp:
        given = [str(_read_stdin(Path(tmp))) if a in STDIN else a for a in paths]
        shown = {g: a for g, a in zip(given, paths) if a in STDIN}  # the temp file is "-" in the output
        files = collect_paths(given)
        if out_path:
            check_output(out_path, inputs=[*map(Path, paths), *files])
            if timeline:
                check_output(timeline_path(out_path), inputs=[*map(Path, paths), *files])
        clf = load(model, device, batch_size=batch_size, reject=reject)
        results = clf.classify_files(files, window_s=window_s, hop_s=hop_s, timeline=timeline, top_k=top_k,
                                     quiet=quiet)
        failed = _write_results(results, out_path, "submission" if submission else kind, clf.labels, shown,
                                summary=not (timeline and out_path is None), top_k=top_k, probs=probs,
                                timeline=timeline and not submission, tags=clf.multilabel)
    log.info("%d file(s) classified, %d failed%s", len(files) - failed, failed,
             f"; wrote {out_path}" if out_path else "")
    return 1 if failed == len(files) else 0


class _Tally:
    """How many results failed and how many names needed escapes, counted as the results pass."""

    def __init__(self):
        self.failed, self.escaped = 0, 0

    def shown(self, results: Iterable[dict], shown: dict) -> Iterator[dict]:
        """``results`` with printable names (``shown`` renames the stdin temp file); each failure logged."""
        for r in results:
            raw = r["path"]
            name = shown.get(raw, raw)
            r["path"] = _printable(name)
            self.escaped += r["path"] != name
            if r["error"]:
                r["error"] = _printable(r["error"].replace(raw, name))
                log.warning("%s", r["error"])
                self.failed += 1
            yield r

    def warn_escaped(self) -> None:
        if self.escaped:
            log.warning("%d file name(s) are not valid UTF-8: written with \\xNN escapes for the bytes that are not",
                        self.escaped)


def _write_results(results: Iterable[dict], out: Optional[Path], kind: str, labels: list[str], shown: dict, *,
                   summary: bool, top_k: int, probs: bool, timeline: bool, tags: bool = False) -> int:
    """Write ``results`` as they come to ``out`` (atomically; stdout when ``None``) in ``kind`` (``.csv``,
    ``.json``, ``.parquet`` or ``submission``), with printable names (``shown`` renames the stdin temp file):
    for a table kind, the per-file table (when ``summary``) and with ``timeline`` the timeline table (to
    :func:`timeline_path`). Returns how many files failed."""
    tally = _Tally()
    named = tally.shown(results, shown)
    with ExitStack() as stack:

        def opened(path: Optional[Path]):
            """``path`` (stdout when ``None``) open for writing, moved into place when every table is done."""
            if path is None:
                return sys.stdout
            tmp = stack.enter_context(atomic_path(path))
            return stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))

        if kind == "submission":
            write_submission(opened(out), named)
        elif kind == ".json":
            write_json(opened(out), named, labels)
        else:
            def table(path: Optional[Path], fields: list[str]) -> TableWriter:
                return TableWriter(fields, parquet=path) if kind == ".parquet" else TableWriter(fields, opened(path))

            files = table(out, summary_fields(labels, top_k, probs, tags)) if summary else None
            windows = table(timeline_path(out) if out else None, TIMELINE_FIELDS) if timeline else None
            for r in named:
                if files:
                    files.write([summary_row(r, probs, labels)])
                if windows:
                    windows.write(timeline_rows(r))
            for t in (files, windows):
                if t:
                    t.close()
    tally.warn_escaped()
    return tally.failed


# ---------------------------------------------------------------------------------------------- --out DIR

def _is_folder(out: Path) -> bool:
    """Whether ``--out`` names a folder: an existing one, or a new name without a suffix. A name ending in
    ``.csv``, ``.json`` or ``.parquet`` is always a file (and refused if it is a folder)."""
    return out.suffix.lower() not in FILE_KINDS and (out.is_dir() or not out.suffix)


def _check_folder(folder: Path) -> None:
    """Refuse an ``--out DIR`` that is a file, before the inputs are listed."""
    if folder.exists() and not folder.is_dir():
        raise AudioclfError(f"--out {folder} is a file: name a folder (new or existing) for --out DIR, or a .csv, "
                            f".json or .parquet file")


def _make_folder(folder: Path) -> None:
    """Make ``--out DIR`` and its parts folder, or refuse it, before any model work."""
    check_output(folder / PARTS, folder=True)
    try:
        (folder / PARTS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AudioclfError(f"--out {folder}: cannot create the folder ({e.strerror})") from None


def _check_options(folder: Path, options: dict) -> None:
    """The options that shape the rows must be the ones ``folder``'s parts were made with, else a rerun
    would mix two kinds of rows: refuse a change, naming it."""
    path = folder / OPTIONS
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AudioclfError(f"{path}: unreadable ({e}); delete it only if every part in {folder / PARTS} was made "
                            f"with today's options") from None
    changed = [f"{k}={v!r} (the parts have {saved.get(k)!r})" for k, v in options.items() if saved.get(k) != v]
    if changed:
        raise AudioclfError(f"--out {folder} holds predictions made with other options: {', '.join(changed)}; give "
                            f"the same options to continue them, or another --out folder")


def _record_options(folder: Path, options: dict) -> None:
    """Keep the options for later runs' :func:`_check_options`, once they have passed the classifier's checks
    and before the first part is written (every process that writes a part does this: the same file)."""
    if not (folder / OPTIONS).is_file():
        with atomic_path(folder / OPTIONS) as tmp:
            tmp.write_text(json.dumps(options, indent=1) + "\n", encoding="utf-8")


def _done(folder: Path, skip_run: str, retry_errors: bool, options: dict) -> set[str]:
    """The files whose latest row in ``folder``'s parts is complete (and, with ``retry_errors``, not an error);
    every part must have been made with ``options``."""
    fields = part_fields(folder)
    if fields is None:
        return set()
    error = fields.index("error")
    latest = {}
    for _, (row, *_) in read_parts(folder, fields, skip_run=skip_run, expected=options):
        latest[row[0]] = not (retry_errors and row[error])
    return {name for name, done in latest.items() if done}


def _write_part(results: Iterable[dict], part: Path, labels: list[str], options: dict, tags: bool) -> None:
    """Append the rows of ``results`` to the part file ``part`` as they come (columns: :mod:`.parts`), the
    ``options`` and ``labels`` first; ``tags``: a multilabel model's."""
    tally = _Tally()
    top_k, probs, timeline = options["top_k"], options["probs"], options["timeline"]
    fields = summary_fields(labels, top_k, probs, tags) + (WINDOW_FIELDS if timeline else [])
    with PartWriter(part, fields, meta={**options, "labels": labels}) as writer:
        for r in tally.shown(results, {}):
            writer.write(timeline_rows(r) + [summary_row(r, probs, labels)])  # the file's own row last: it marks the file complete
    tally.warn_escaped()


def _merge(folder: Path, names: list[str], formats: tuple, run_id: str, options: dict) -> dict:
    """Every part merged into ``folder/predictions.csv`` and/or ``.parquet`` (atomically), and the windows of
    ``--timeline`` into ``folder/timeline.csv`` and/or ``.parquet``: one file's rows per name in ``names``, in
    that order, each file's latest rows (parts of a later run win).

    Returns:
        dict: ``now`` (files classified by run ``run_id``), ``before`` (done by earlier runs), ``failed``
        (files whose latest row is an error), counted once per file however often it is named.

    Raises:
        AudioclfError: when a name has no complete row in any part (its process stopped early).
    """
    wanted, latest = set(names), {}
    fields = part_fields(folder) or []
    for run, record in read_parts(folder, fields, expected=options):
        if record[0][0] in wanted:
            latest[record[0][0]] = (run == run_id, record)
    missing = [name for name in wanted if name not in latest]
    if missing:
        raise AudioclfError(f"{len(missing)} of {len(wanted)} input(s) have no complete row in {folder / PARTS} (e.g. "
                            f"{missing[0]}): a process stopped before its share was done; run the same command again "
                            f"to classify them")
    timeline = fields[-len(WINDOW_FIELDS):] == WINDOW_FIELDS
    columns = fields[:-len(WINDOW_FIELDS)] if timeline else fields
    window_columns = [fields.index(f) for f in TIMELINE_FIELDS] if timeline else []
    tables = {"predictions": (columns, [row[:len(columns)] for name in names for row in latest[name][1][:1]])}
    if timeline:
        tables["timeline"] = (TIMELINE_FIELDS, [[row[i] for i in window_columns] for name in names
                                                for row in latest[name][1][1:]])
    for table, (header, rows) in tables.items():
        for kind in formats:
            if kind == "csv":
                with atomic_path(folder / f"{table}.csv") as tmp:
                    write_csv_rows(tmp, header, rows)
            else:
                write_parquet_rows(folder / f"{table}.parquet", header, rows)
    now = sum(new for new, _ in latest.values())
    error = fields.index("error")
    return {"now": now, "before": len(latest) - now, "failed": sum(bool(rec[0][error]) for _, rec in latest.values())}


def predict_to_folder(model, paths: Sequence[str], folder: Path, *, out_format: Optional[str] = None,
                      retry_errors: bool = False, top_k: int = PredictOptions.top_k,
                      batch_size: int = PredictOptions.batch_size, device: str = PredictOptions.device,
                      window_s: Optional[float] = None, hop_s: Optional[float] = None, timeline: bool = False,
                      probs: bool = False, quiet: bool = False, reject: bool = PredictOptions.reject) -> int:
    """``audioclf predict --out DIR``: resumable prediction, shared among torchrun's processes.

    Every process collects the same inputs in the same order and skips the files that ``DIR/parts`` already
    holds a complete row for (a row with an ``error`` counts as done, unless ``retry_errors``); process ``r``
    of ``w`` (torchrun's ``RANK`` and ``WORLD_SIZE``; 0 of 1 without torchrun) classifies every ``w``-th of
    the others from the ``r``-th on and appends their rows to ``DIR/parts/part-<run id>-<r>.csv``, synced
    every :data:`~audioclf.commands.parts.CHUNK_ROWS` rows or :data:`~audioclf.commands.parts.CHUNK_S`
    seconds. When all are done, process 0 merges every part into ``DIR/predictions.csv`` (and with
    ``timeline`` ``DIR/timeline.csv``): the rows of ``--out x.csv`` (and ``x.timeline.csv``), one file's
    rows per input, in input order, a file's latest rows winning.

    Args:
        folder (Path): the folder, made when missing.
        out_format (str, optional): ``csv``, ``parquet`` (needs pyarrow) or ``both``. (Default: ``csv``)
        retry_errors (bool, optional): classify again the files whose latest row is an error. (Default: ``False``)
        The others: as in :func:`run_predict`; under torchrun a CUDA device is ``cuda:LOCAL_RANK``.

    Returns:
        int: the exit code: 1 when every file failed, else 0.

    Raises:
        AudioclfError: for options, inputs or a folder that cannot work, before the model loads; for options
            that differ from those the folder's parts were made with.
    """
    if out_format not in (None, *FORMATS):
        raise AudioclfError(f"Unsupported --out-format {out_format}; choose {', '.join(FORMATS)}")
    formats = FORMATS[out_format or "csv"]
    if any(a in STDIN for a in paths):
        raise AudioclfError("stdin ('-') cannot be classified into --out DIR: a rerun could not tell whether it was "
                            "done; give --out NAME.csv, or no --out")
    if "parquet" in formats:
        require_pyarrow()
    _check_folder(folder)
    files = collect_paths(paths)
    _make_folder(folder)
    by_name: dict[str, Path] = {}
    for p in files:  # a file named twice is classified once
        by_name.setdefault(_printable(str(p)), p)
    rank, _, world = dist_info()
    options = {"model": str(Path(model).resolve()), "top_k": top_k, "window_s": window_s, "hop_s": hop_s,
               "timeline": timeline, "probs": probs}
    _check_options(folder, options)
    who = f"rank {rank} of {world}: " if world > 1 else ""
    t0 = time.perf_counter()
    with process_group(resolve_device(device)) as dev:
        run_id = broadcast(new_run_id() if rank == 0 else None, dev)
        done = _done(folder, run_id, retry_errors, options)
        todo = [p for name, p in by_name.items() if name not in done]
        mine = todo[rank::world]
        log.info("%sclassifying %d of %d file(s); %d done before", who, len(mine), len(by_name), len(by_name) - len(todo))
        if mine:
            clf = load(model, str(dev), batch_size=batch_size, reject=reject)
            results = clf.classify_files(mine, window_s=window_s, hop_s=hop_s, timeline=timeline, top_k=top_k,
                                         quiet=quiet or rank != 0)  # checks its options now, before any part
            _record_options(folder, options)
            try:
                _write_part(results, part_path(folder, run_id, rank), clf.labels, options, clf.multilabel)
            except KeyboardInterrupt:
                log.warning("interrupted: the rows so far are in %s; run the same command again to continue",
                            folder / PARTS)
                raise
        barrier(dev)  # every rank, with files or without: rank 0 merges only once all parts are complete
    if rank != 0:
        return 0
    counts = _merge(folder, [_printable(str(p)) for p in files], formats, run_id, options)
    elapsed = time.perf_counter() - t0
    written = [folder / f"{t}.{f}" for t in TABLES[:1 + timeline] for f in formats]
    log.info("%d classified now, %d skipped as done, %d failed; wrote %s (%.1f s%s)", counts["now"], counts["before"],
             counts["failed"], " and ".join(map(str, written)), elapsed,
             f", {counts['now'] / elapsed:.1f} files/s" if counts["now"] else "")
    return 1 if counts["failed"] == len(by_name) else 0
