"""The tables ``audioclf predict`` writes, and their columns.

The per-file table: ``path, label, confidence``, then the ``top_k`` best classes as ``label_1, prob_1, ...,
label_k, prob_k`` (most probable first), then for a multilabel model ``tags``, the classes at or above their
thresholds joined by ``;`` (the manifest's spelling), then with ``probs`` one column per class, ``p_<class>``,
in the model's label order, and last ``error`` (empty, or why the file could not be read; its other cells are
then empty). The prefix ``p_`` keeps a class named ``1`` (a spoken digit) apart from ``prob_1``.

The timeline table (``--timeline``): ``path, start_s, end_s, label, prob``, one row per window, in time order.

The same rows go to CSV and Parquet (numbers as floats, empty cells as nulls); in CSV, text that a
spreadsheet would run as a formula gets a leading ``'`` (:func:`audioclf.fileio.csv_cell`). JSON keeps each file's
result whole: its probabilities by class, its top-k and its windows nested in it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Iterable

from ..fileio import csv_cell, write_parquet

TIMELINE_FIELDS = ["path", "start_s", "end_s", "label", "prob"]
_TEXT = ("path", "label", "tags", "error")  # every other column holds numbers (label_N too is text)


def summary_fields(labels: list[str], top_k: int, probs: bool, tags: bool = False) -> list[str]:
    """The per-file table's columns for a model with ``labels``; ``tags``: a multilabel model's."""
    ranks = range(1, min(top_k, len(labels)) + 1)
    return (["path", "label", "confidence"] + [f"{c}_{i}" for i in ranks for c in ("label", "prob")]
            + (["tags"] if tags else []) + ([f"p_{c}" for c in labels] if probs else []) + ["error"])


def summary_row(r: dict, probs: bool, labels: list[str]) -> dict:
    """One result's row of the per-file table (``{path, error}`` for a file that failed)."""
    if r["error"]:
        return {"path": r["path"], "error": r["error"]}
    row = {"path": r["path"], "label": r["label"], "confidence": f"{r['confidence']:.4f}"}
    for i, t in enumerate(r["top_k"], 1):
        row[f"label_{i}"], row[f"prob_{i}"] = t["label"], f"{t['prob']:.4f}"
    if "tags" in r:
        row["tags"] = ";".join(t["label"] for t in r["tags"])
    if probs:
        row.update({f"p_{c}": f"{p:.4f}" for c, p in zip(labels, r["probs"])})
    return row


def timeline_rows(r: dict) -> list[dict]:
    """One result's rows of the timeline table (none for a file that failed)."""
    return [{"path": r["path"], "start_s": f"{w['start_s']:.3f}", "end_s": f"{w['end_s']:.3f}", "label": w["label"],
             "prob": f"{w['confidence']:.4f}"} for w in r.get("windows", ())]


def is_number(field: str) -> bool:
    return not (field in _TEXT or field.startswith("label_"))


class TableWriter:
    """Rows of one table (``fields``) to an open CSV file, or gathered for a Parquet file (written by ``close``)."""

    def __init__(self, fields: list[str], f: IO[str] | None = None, parquet: Path | None = None):
        self.fields, self.parquet = fields, parquet
        self._csv = None if f is None else csv.DictWriter(f, fields, restval="", lineterminator="\n")
        self._rows: list[list[str]] = []
        if self._csv is not None:
            self._csv.writeheader()

    def write(self, rows: Iterable[dict]) -> None:
        if self._csv is not None:
            self._csv.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
        else:
            self._rows += ([row.get(f, "") for f in self.fields] for row in rows)

    def close(self) -> None:
        if self.parquet is not None:
            write_parquet_rows(self.parquet, self.fields, self._rows)


def write_parquet_rows(out: Path, fields: list[str], rows: Iterable[list[str]]) -> None:
    """CSV rows (lists of strings in ``fields`` order) as a Parquet file: numbers as floats, empty cells null."""
    numbers = {f for f in fields if is_number(f)}
    columns: dict[str, list] = {f: [] for f in fields}
    for row in rows:
        for f, cell in zip(fields, row):
            columns[f].append((float(cell) if f in numbers else cell) if cell else None)
    write_parquet(out, columns, {f: float if f in numbers else str for f in fields})


def write_csv_rows(path: Path, fields: list[str], rows: Iterable[list[str]]) -> None:
    """CSV rows (lists of strings in ``fields`` order) to the open-for-writing ``path``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(fields)
        w.writerows([csv_cell(cell) for cell in row] for row in rows)


def write_submission(f: IO[str], results: Iterable[dict]) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["ID", "Class"])
    for r in results:  # a failed file keeps its row, with no class, so the IDs stay complete
        w.writerow([csv_cell(Path(r["path"]).name), csv_cell(r.get("label", ""))])


def write_json(f: IO[str], results: Iterable[dict], labels: list[str]) -> None:
    items = []
    for r in results:
        item = {"path": r["path"], "label": r.get("label"), "confidence": r.get("confidence"),
                "probs": dict(zip(labels, r["probs"])) if "probs" in r else None,
                "top_k": r.get("top_k"), "duration_s": r.get("duration_s"), "error": r["error"]}
        if "tags" in r:
            item["tags"] = r["tags"]
        if "windows" in r:
            item["windows"] = r["windows"]
        items.append(item)
    json.dump(items, f, indent=2)
    f.write("\n")
