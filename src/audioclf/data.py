"""Datasets: where clips come from and how they are split.

A clip holds one class (a folder, ESC-50, UrbanSound8K, a manifest's ``label`` column) or, in a multilabel
manifest (a ``labels`` column: class names joined by ``;``), several or none. A folder layout cannot say
that a clip holds several classes; either kind trains as ``multilabel``.

Flow: ``load_clips`` (folder / csv / esc50 / urbansound8k / webdataset shards, ``webdata.py``) ->
``store.FeatureBank.build`` (the features, on disk once per dataset and feature config) -> ``split_clips``
(folds, or a stratified split that keeps every group on one side) -> ``store.FeatureBank.batch`` (crop, collate).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .audio import AUDIO_EXTENSIONS, link_problem, source_exists
from .clips import LABEL_SEPARATOR, Clip, ClipSet
from .config import DataConfig
from .errors import AudioclfError
from .fileio import atomic_path
from .webdata import read_webdataset

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sources

def _is_utf8(name: str) -> bool:
    """Whether a file name decoded by Python (bytes that are not UTF-8 become surrogates) is valid UTF-8."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_folder(root) -> ClipSet:
    """``ROOT/<class name>/**/<clip>``: one sub-folder per class, class names sorted. Symlinks that lead
    to no file are listed in ``skipped`` with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise AudioclfError(f"{root}: not a folder (format 'folder' wants ROOT/<class>/<clips>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    undecodable = [d.name for d in class_dirs if not _is_utf8(d.name)]
    if undecodable:  # decided once, here: a class name is written to CSV, JSON and HTTP answers, all UTF-8
        shown = undecodable[0].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise AudioclfError(f"{root}: the class folder name {shown!r} is not valid UTF-8 (\\xNN: bytes that are "
                            f"not); class names go into CSV, JSON and the API, so rename the folder")
    hidden = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(".")
                    and any(f.suffix.lower() in AUDIO_EXTENSIONS for f in p.iterdir()))
    if hidden:
        log.warning("%s: folder(s) %s hold audio but are hidden (a name starting with '.'), so they are not classes; "
                    "rename them to use them", root, ", ".join(hidden))
    classes, clips, skipped = [], [], []
    for d in class_dirs:
        files = []
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            if p.is_file():
                files.append(p)
            elif why := link_problem(p):
                skipped.append((os.path.abspath(p), why))
        if not files:
            log.warning("%s: class folder holds no audio files (%s); left out", d, ", ".join(AUDIO_EXTENSIONS))
            continue
        clips += [Clip(os.path.realpath(f), len(classes)) for f in files]
        classes.append(d.name)
    if skipped:
        log.warning("%d symlink(s) lead to no file, e.g. %s: %s; they are left out", len(skipped), *skipped[0])
    return ClipSet(clips, classes, skipped)


def _read_table(path, required: Sequence[str], either: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, row) of each row of a UTF-8 CSV that has the ``required`` columns, and at least one
    of ``either`` when given."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, r) for r in reader]
            columns = reader.fieldnames or []
    except OSError as e:
        raise AudioclfError(f"{path}: cannot read the CSV ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AudioclfError(f"{path}: not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}, as Latin-1 "
                            f"or Windows-1252 files do); save the CSV as UTF-8") from None
    except csv.Error as e:
        raise AudioclfError(f"{path}: not a readable CSV ({e})") from None
    if not columns:
        raise AudioclfError(f"{path}: the CSV is empty; it needs a header line ({', '.join(required)}) "
                            f"and one row per clip")
    missing = [c for c in required if c not in columns]
    if either and not set(either) & set(columns):
        missing.append(" or ".join(either))
    if missing:
        raise AudioclfError(f"{path}: missing column(s) {', '.join(missing)}; "
                            f"needed: {', '.join(required)}; found: {', '.join(columns)}")
    if not rows:
        raise AudioclfError(f"{path}: the CSV has a header but no rows; add one row per clip")
    return rows


def _int(value, what: str, path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AudioclfError(f"{path}: {what}={value!r} is not an integer") from None


# One metadata row: audio file, class name (or a multilabel row's class names, sorted), fold, group, line in
# the metadata file.
Row = tuple[Path, Union[str, tuple[str, ...]], Optional[int], Optional[str], int]


def _one_row_per_file(rows: list[Row], source) -> list[Row]:
    """Rows with each file listed once. The same file (``a.wav`` and ``./a.wav`` count as one) listed
    again with the same label, fold and group is kept once, with a warning; with another label, fold or
    group it is an error: it would carry two answers, or be tested on what it was trained on."""
    by_file: dict[str, list[Row]] = {}
    for row in rows:
        if isinstance(row[1], str) and not row[1].strip():  # a multilabel row may hold no class: no target sound
            raise AudioclfError(f"{source} line {row[4]}: the label of {row[0]} is empty; every row needs one")
        by_file.setdefault(os.path.realpath(row[0]), []).append(row)
    conflicts, repeats = [], []
    for same in by_file.values():
        for k, what in ((1, "labels"), (2, "folds"), (3, "groups")):
            values = list(dict.fromkeys(r[k] for r in same))
            if len(values) > 1:
                conflicts.append(f"{same[0][0]} is on lines {', '.join(str(r[4]) for r in same)} with {what} "
                                 f"{', '.join(map(repr, values))}")
                break
        else:
            repeats += [(same[0], r) for r in same[1:]]
    if conflicts:
        raise AudioclfError(f"{source}: {len(conflicts)} audio file(s) listed more than once with different values: "
                            f"{'; '.join(conflicts[:3])}{'; ...' if len(conflicts) > 3 else ''}. A file has one "
                            f"label, fold and group (in two folds it is tested on what it was trained on): "
                            f"remove the extra rows")
    if repeats:
        first, again = repeats[0]
        log.warning("%s: %d duplicate row(s), each kept once; e.g. line %d repeats line %d (%s)",
                    source, len(repeats), again[4], first[4], first[0])
    return [same[0] for same in by_file.values()]


def _from_rows(rows: list[Row], source, classes: Optional[list[str]] = None) -> ClipSet:
    """Metadata rows -> ClipSet (``source``: the metadata file, for messages); rows whose file is missing
    are listed in ``skipped``."""
    rows = _one_row_per_file(rows, source)
    classes = classes or sorted({n for _, name, _, _, _ in rows for n in _names(name)})
    index = {name: i for i, name in enumerate(classes)}
    clips, skipped = [], []
    for path, name, fold, group, _ in rows:
        if source_exists(path):  # a file, or a tar member (cv's folds.csv of a shard set lists those)
            clips.append(_clip(os.path.realpath(path), name, fold, group, index))
        else:
            skipped.append((os.path.abspath(path), link_problem(path) or "file listed in the metadata is missing"))
    if skipped:
        log.warning("%d listed file(s) are missing, e.g. %s (%s); they are left out", len(skipped), *skipped[0])
    return ClipSet(clips, classes, skipped)


def _names(name: Union[str, tuple[str, ...]]) -> tuple[str, ...]:
    return (name,) if isinstance(name, str) else name


def _clip(path: str, name: Union[str, tuple[str, ...]], fold, group, index: dict[str, int]) -> Clip:
    """A clip of one class (``name`` a str), or of a multilabel row's classes (a tuple, maybe empty)."""
    if isinstance(name, str):
        return Clip(path, index[name], fold, group)
    tags = tuple(sorted(index[n] for n in name))
    return Clip(path, tags[0] if tags else -1, fold, group, tags)


def split_labels(cell: str) -> tuple[str, ...]:
    """A ``labels`` cell's class names: split at ``;``, blanks around them dropped, sorted, each once; an
    empty cell holds none (a clip with no target sound)."""
    return tuple(sorted({n.strip() for n in (cell or "").split(LABEL_SEPARATOR) if n.strip()}))


def read_csv(path) -> ClipSet:
    """A manifest with columns ``path`` and ``label`` (one class name) or ``labels`` (class names joined
    by ``;``, any number, empty for a clip without a target sound: a multilabel dataset), and optional
    ``fold``, ``group``; relative paths resolve against the CSV's folder. The same file listed twice must
    have the same label(s), fold and group."""
    path = Path(path)
    items = []
    for line, r in _read_table(path, ["path"], either=["label", "labels"]):
        if not (r["path"] or "").strip():
            raise AudioclfError(f"{path} line {line}: the path is empty; every row names an audio file")
        fold = _int(r["fold"], "fold", path) if r.get("fold") not in (None, "") else None
        name = split_labels(r["labels"]) if "labels" in r else r["label"] or ""
        items.append((path.parent / r["path"], name, fold, r.get("group") or None, line))
    return _from_rows(items, path)


def read_esc50(root, esc10: bool = False) -> ClipSet:
    """ESC-50: ``audio/`` + ``meta/esc50.csv``; labels from ``category`` (remapped to 0..K-1 in the order
    of ESC-50's ``target``), ``group`` = ``src_file`` (clips cut from one recording stay together)."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    rows = _read_table(meta, ["filename", "fold", "target", "category", "esc10", "src_file"])
    if esc10:
        rows = [(line, r) for line, r in rows if r["esc10"].strip().lower() in ("true", "1")]
        if not rows:
            raise AudioclfError(f"{meta}: no row has esc10=True, so the --esc10 subset is empty")
    by_target = {_int(r["target"], "target", meta): r["category"] for _, r in rows}
    classes = [by_target[t] for t in sorted(by_target)]
    items = [(root / "audio" / r["filename"], r["category"], _int(r["fold"], "fold", meta), r["src_file"], line)
             for line, r in rows]
    return _from_rows(items, meta, classes)


def read_urbansound8k(root) -> ClipSet:
    """UrbanSound8K: ``audio/foldN/`` + ``metadata/UrbanSound8K.csv``; ``group`` = ``fsID``."""
    root = Path(root)
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = _read_table(meta, ["slice_file_name", "fsID", "fold", "classID", "class"])
    by_id = {_int(r["classID"], "classID", meta): r["class"] for _, r in rows}
    classes = [by_id[i] for i in sorted(by_id)]
    items = [(root / "audio" / f"fold{r['fold']}" / r["slice_file_name"], r["class"],
              _int(r["fold"], "fold", meta), r["fsID"], line) for line, r in rows]
    return _from_rows(items, meta, classes)


def load_clips(config: DataConfig) -> ClipSet:
    """Read the dataset ``config`` describes and check it can train a classifier."""
    if not config.root:
        raise AudioclfError("no dataset given: pass the data folder or CSV (DataConfig.root)")
    readers = {"folder": read_folder, "csv": read_csv, "urbansound8k": read_urbansound8k,
               "esc50": lambda root: read_esc50(root, config.esc10), "webdataset": read_webdataset}
    clipset = readers[config.format](config.root)
    if config.esc10 and config.format != "esc50":
        raise AudioclfError(f"--esc10 applies to format 'esc50' only, not {config.format!r}")
    check_classes(clipset, config.root)
    return clipset


def check_classes(clipset: ClipSet, where) -> None:
    counts = class_counts(clipset.clips)
    if len(clipset.classes) < 2:
        raise AudioclfError(f"{where}: found {len(clipset.classes)} class(es) {clipset.classes}; a classifier "
                            f"needs at least 2 (one sub-folder or label value per class)")
    empty = [name for i, name in enumerate(clipset.classes) if counts[i] == 0]
    if empty:
        raise AudioclfError(f"{where}: class(es) {', '.join(empty)} have no readable clips; add clips or remove the class")


def class_counts(clips: Sequence[Clip]) -> Counter:
    """Clips per class index, each clip counted once for every class it holds."""
    return Counter(t for c in clips for t in c.targets)


# ---------------------------------------------------------------------------------------------- splits

def split_clips(clips: Sequence[Clip], *, val_fold: Optional[int] = None, test_fold: Optional[int] = None,
                val_split: float = 0.2, seed: int = 42, classes: Optional[Sequence[str]] = None) -> dict[str, list[Clip]]:
    """Split into ``train``/``val``/``test``.

    ``test_fold`` and ``val_fold`` take whole folds. Without ``val_fold``, validation is a stratified
    ``val_split`` fraction of the remaining clips chosen by whole groups (``StratifiedGroupKFold``), so
    clips cut from one recording never straddle train and validation. A class that ends up with no
    validation clips is named (``classes``: label -> name) in a warning.
    """
    folds = sorted({c.fold for c in clips if c.fold is not None})
    for name, k in (("val_fold", val_fold), ("test_fold", test_fold)):
        if k is not None and k not in folds:
            raise AudioclfError(f"{name}={k} has no clips; folds in this dataset: {folds or 'none (no fold column)'}")
    test = [c for c in clips if test_fold is not None and c.fold == test_fold]
    rest = [c for c in clips if test_fold is None or c.fold != test_fold]
    if val_fold is not None:
        val = [c for c in rest if c.fold == val_fold]
        train = [c for c in rest if c.fold != val_fold]
    else:
        train, val = group_split(rest, val_split, seed, classes)
    if not train or not val:
        raise AudioclfError(f"the split leaves {len(train)} training and {len(val)} validation clips; both need "
                            f"clips (add data, or change val_fold/val_split)")
    in_train = class_counts(train)
    unvalidated = sorted(set(in_train) - set(class_counts(val)))
    if unvalidated:
        log.warning("class(es) %s have no validation clips, so validation says nothing about them (a class with "
                    "a single clip or recording can never be in validation); add clips to them",
                    ", ".join(f"{classes[k] if classes else f'label {k}'!r} ({in_train[k]} training clip(s))"
                              for k in unvalidated))
    return {"train": train, "val": val, "test": test}


def _stratified_group_folds(labels: Sequence[int], groups: Sequence, n_splits: int, seed: int, need: str, fix: str,
                            classes: Optional[Sequence[str]] = None):
    """sklearn's ``StratifiedGroupKFold(n_splits).split``, with its two complaints made ours: fewer clips in
    every class than ``n_splits`` is an AudioclfError that gives each class's count and what ``need`` (the
    split) needs, and ``fix``; fewer in some classes is a warning naming them, not sklearn's UserWarning with
    its source path."""
    from sklearn.model_selection import StratifiedGroupKFold

    counts = Counter(labels)
    name = (lambda k: classes[k]) if classes else (lambda k: f"label {k}")
    per_class = ", ".join(f"{name(k)}: {n}" for k, n in sorted(counts.items()))
    if all(n < n_splits for n in counts.values()):
        raise AudioclfError(f"too few clips for {need}: it splits each class {n_splits} ways, so a class needs at least "
                            f"{n_splits} clips; clips per class: {per_class}. Add clips, or {fix}")
    short = [f"{name(k)} ({n})" for k, n in sorted(counts.items()) if n < n_splits]
    if short:
        log.warning("class(es) %s have fewer than %d clips, so %s cannot stratify them evenly", ", ".join(short),
                    n_splits, need)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)  # said above, in our words
        yield from splitter.split(np.zeros(len(labels)), labels, groups)


def group_split(clips: Sequence[Clip], val_split: float, seed: int,
                classes: Optional[Sequence[str]] = None) -> tuple[list[Clip], list[Clip]]:
    """Stratified by label, whole groups to one side; about ``val_split`` of the clips go to validation.
    A class with a single group stays in training: in validation the model could not have learnt it.
    ``classes`` (label -> name) names classes in messages."""
    n_splits = max(2, int(round(1 / val_split)))
    groups = [c.group_key for c in clips]
    groups_of: dict[int, set] = {}
    for c, g in zip(clips, groups):
        groups_of.setdefault(c.label, set()).add(g)
    single = {label for label, g in groups_of.items() if len(g) == 1}
    pool = [i for i, c in enumerate(clips) if c.label not in single]
    for n_groups, where in ((len(set(groups)), ""), (len({groups[i] for i in pool}), " outside single-group classes")):
        if n_groups < n_splits:
            raise AudioclfError(f"only {n_groups} group(s){where}: too few for a {val_split:.0%} validation split "
                                f"that keeps groups apart; add data or give a val_fold")
    _, val_idx = next(_stratified_group_folds([clips[i].label for i in pool], [groups[i] for i in pool], n_splits, seed,
                                              f"a {val_split:.0%} validation split",
                                              "give a larger val_split or a val_fold", classes))
    val = {pool[j] for j in val_idx}
    return [c for i, c in enumerate(clips) if i not in val], [clips[i] for i in sorted(val)]


def assign_folds(clips: Sequence[Clip], n_folds: int, seed: int, classes: Optional[Sequence[str]] = None) -> list[int]:
    """Fold 1..``n_folds`` of each clip: stratified by label, whole groups (a clip without one is its own
    group) in one fold, so cross-validation never tests on a recording it trained on. ``classes`` (label ->
    name) names classes in messages."""
    groups = [c.group_key for c in clips]
    if n_folds < 2 or len(set(groups)) < n_folds:
        raise AudioclfError(f"n_folds={n_folds}: need at least 2 folds and no more folds than the "
                            f"{len(set(groups))} group(s) in the data")
    fold = np.zeros(len(clips), dtype=int)
    folds = _stratified_group_folds([c.label for c in clips], groups, n_folds, seed, f"{n_folds} folds",
                                    "ask for fewer folds (n_folds)", classes)
    for k, (_, test) in enumerate(folds, 1):
        fold[test] = k
    return fold.tolist()


def write_folds(clipset: ClipSet, path, n_folds: int, seed: int) -> Path:
    """Write ``clipset`` with :func:`assign_folds`' folds as a CSV manifest (``path,label,fold,group``, or
    ``path,labels,fold,group`` for a multilabel one: the layouts ``read_csv`` reads) and return its path."""
    path = Path(path)
    folds = assign_folds(clipset.clips, n_folds, seed, clipset.classes)
    multi = clipset.multilabel
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # as read_csv reads it
        w = csv.writer(f)
        w.writerow(["path", "labels" if multi else "label", "fold", "group"])
        w.writerows([c.path, LABEL_SEPARATOR.join(clipset.classes[t] for t in c.targets) if multi
                     else clipset.classes[c.label], k, c.group_key] for c, k in zip(clipset.clips, folds))
    log.info("no folds in the dataset: %d stratified group folds written to %s", n_folds, path)
    return path
