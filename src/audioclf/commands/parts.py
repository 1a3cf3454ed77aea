"""The part files of ``audioclf predict --out DIR``: each process appends the rows of the files it classifies
to its own ``DIR/parts/part-<run id>-<rank>.csv``, synced to disk chunk by chunk, so a killed job loses at
most its last chunk. A rerun reads every part to skip the files already done; at the end rank 0 merges them.

A part holds the rows of both of ``--out x.csv``'s tables in one CSV, in the per-file table's columns
followed, with ``--timeline``, by ``start_s``, ``end_s`` and ``prob``: a file's window rows (those with a
``start_s``) come before its own row, so that its own row, written last, says that the file is complete.
Its first line, ``#audioclf-part {...}``, holds the options and the model's labels it was made with, so that
a part is checked on every read, whatever became of ``DIR/options.json``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from ..errors import AudioclfError

PARTS = "parts"  # the sub-folder of --out DIR that holds them
CHUNK_ROWS = 100  # rows written between two syncs at most
CHUNK_S = 10.0  # seconds between two syncs at most, while rows arrive
META = "#audioclf-part "  # starts a part's first line: its options and labels, as JSON
_NAME = re.compile(r"^part-(?P<run>\d{8}T\d{12}Z)-(?P<rank>\d+)\.csv$")


def new_run_id() -> str:
    """A name for one run's parts that sorts after every earlier run's: the UTC time to the microsecond."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def part_path(folder: Path, run_id: str, rank: int) -> Path:
    return Path(folder) / PARTS / f"part-{run_id}-{rank}.csv"


def list_parts(folder: Path) -> list[tuple[str, Path]]:
    """``(run id, path)`` of every part in ``folder``, oldest run first (within a run, by rank)."""
    found = []
    for path in (Path(folder) / PARTS).glob("part-*.csv"):
        m = _NAME.match(path.name)
        if m:
            found.append((m["run"], int(m["rank"]), path))
    return [(run, path) for run, _, path in sorted(found)]


class PartWriter:
    """One process's part file: rows appended file by file, flushed and fsync'd every ``chunk_rows`` rows or
    ``chunk_s`` seconds, and on close (a Ctrl-C included).

    Args:
        path (Path): the part file to create; an existing file is never overwritten.
        fields (list of str): the CSV columns, written as the header.
        meta (dict, optional): the options and ``labels`` the rows are made with, written first. (Default: none)
        chunk_rows (int, optional): rows written between two syncs at most. (Default: ``CHUNK_ROWS``)
        chunk_s (float, optional): seconds between two syncs at most, while rows arrive. (Default: ``CHUNK_S``)
    """

    def __init__(self, path, fields: list[str], *, meta: Optional[dict] = None, chunk_rows: int = CHUNK_ROWS,
                 chunk_s: float = CHUNK_S):
        self.path, self.chunk_rows, self.chunk_s = Path(path), chunk_rows, chunk_s
        self._file = open(self.path, "x", newline="", encoding="utf-8")
        if meta is not None:
            self._file.write(META + json.dumps(meta, ensure_ascii=True) + "\n")
        # every field quoted: with "\n" line ends, csv leaves a "\r" in a file name unquoted, and reading it fails
        self._csv = csv.DictWriter(self._file, fields, restval="", lineterminator="\n", quoting=csv.QUOTE_ALL)
        self._csv.writeheader()
        self._unsynced, self._synced_at = 0, time.monotonic()

    def write(self, rows: list[dict]) -> None:
        """Append one file's rows: its window rows, then its own row."""
        self._csv.writerows(rows)
        self._unsynced += len(rows)
        if self._unsynced >= self.chunk_rows or time.monotonic() - self._synced_at >= self.chunk_s:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced, self._synced_at = 0, time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.sync()
            finally:
                self._file.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reader(f) -> Iterator[list[str]]:
    """The complete lines of an open part as CSV rows; a torn last line (a killed process) is left out."""
    return csv.reader((line for line in f if line.endswith("\n")), strict=True)


def _open(path: Path):
    # newline="\n": a "\r" inside a quoted file name must not end a line
    return open(path, newline="\n", encoding="utf-8", errors="replace")


def _header(reader) -> tuple[Optional[dict], Optional[list[str]]]:
    """A part's meta line (``None`` when it has none) and its columns, read from its ``reader``."""
    header, meta = next(reader, None), None
    if header and header[0].startswith(META):
        meta = json.loads(",".join(header)[len(META):])  # the csv reader split the JSON at its commas
        header = next(reader, None)
    return meta, header


def part_fields(folder: Path) -> Optional[list[str]]:
    """The columns of the oldest part in ``folder`` (``None`` when it has none): what every part must have."""
    for _, path in list_parts(folder):
        with _open(path) as f:
            try:
                _, header = _header(_reader(f))
            except (csv.Error, ValueError):
                continue  # torn or damaged: read_part names it
        if header is not None:
            return header
    return None


def _check_meta(path: Path, meta: Optional[dict], expected: dict) -> list[str]:
    """The labels ``path`` was made with, once its options are ``expected``'s; else an AudioclfError naming
    the part and the difference."""
    todo = f"move it out of {path.parent}, or use another --out folder"
    if meta is None:
        raise AudioclfError(f"{path}: holds no record of the options it was made with (an older audioclf, or an "
                            f"edit, wrote it), so its rows cannot be trusted; {todo}")
    changed = [f"{k}={v!r} (the part has {meta.get(k)!r})" for k, v in expected.items() if meta.get(k) != v]
    if changed:
        raise AudioclfError(f"{path}: made with other options: {', '.join(changed)}; {todo}")
    return list(meta.get("labels") or [])



def read_part(path: Path, fields: list[str], expected: Optional[dict] = None) -> Iterator[list[list[str]]]:
    """The complete files of one part, in the order written: each a list of rows (lists of strings in
    ``fields`` order), the file's own row first, then its window rows.

    A torn last line (the process was killed mid-write) is left out, and with it the file it belonged to.

    With ``expected`` (options), the part must record the same options, and each file's label must be one of
    the labels it records.

    Raises:
        AudioclfError: naming the part, when its columns are not ``fields`` or its options not ``expected``
            (it was written with other options), or a row's label is not one of the model's.
    """
    path_col = fields.index("path")
    label_col = fields.index("label") if "label" in fields else None
    start_col = fields.index("start_s") if "start_s" in fields else None
    with _open(path) as f:
        reader = _reader(f)
        try:
            meta, header = _header(reader)
            labels = _check_meta(path, meta, expected) if expected is not None else None
            if header is None:
                return
            if header != fields:
                raise AudioclfError(f"{path}: its columns ({', '.join(header)}) are not this run's ({', '.join(fields)}); "
                                    f"it was written with other options: move it out of {path.parent}, or use another "
                                    f"--out folder")
            windows: list[list[str]] = []
            for row in reader:
                if len(row) != len(fields):
                    windows = []
                elif start_col is not None and row[start_col]:
                    windows.append(row)
                else:
                    if labels is not None and label_col is not None and row[label_col] and row[label_col] not in labels:
                        raise AudioclfError(f"{path}: the row of {row[path_col]} has the label {row[label_col]!r}, not "
                                            f"one of the model's classes; the part was edited or made by another "
                                            f"model: move it out of {path.parent}")
                    yield [row, *(w for w in windows if w[path_col] == row[path_col])]
                    windows = []
        except csv.Error:
            return  # a quoted field cut short by the kill: the rest is the torn tail


def read_parts(folder: Path, fields: Optional[list[str]] = None, skip_run: Optional[str] = None,
               expected: Optional[dict] = None) -> Iterator[tuple[str, list[list[str]]]]:
    """``(run id, file's rows)`` for every complete file in every part in ``folder`` but ``skip_run``'s, oldest
    run first: a file classified twice comes last as it was classified last. ``fields``: the columns every
    part must have (default: those of the oldest, :func:`part_fields`); ``expected``: as in :func:`read_part`."""
    fields = fields or part_fields(folder)
    for run, path in list_parts(folder):
        if run != skip_run:
            for record in read_part(path, fields, expected):
                yield run, record
