"""Datasets: where clips come from, how they are split, and the log-mel cache the trainer reads.

Flow: ``load_clips`` (folder / csv / esc50 / urbansound8k / webdataset shards, ``webdata.py``) -> ``FeatureBank.build`` (decode, resample,
batched LogMel, cached on disk once per dataset and feature config) -> ``split_clips`` (folds, or a
stratified split that keeps every group on one side) -> ``FeatureBank.batch`` (crop, collate).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import (AUDIO_EXTENSIONS, default_hop, fix_length, inference_windows, link_problem, load_audio,
                    source_exists)
from .clips import Clip, ClipSet
from .config import AudioclfError, DataConfig, FeatureConfig
from .features import LogMel
from .fileio import atomic_path
from .runtime import auto_workers, cpu_threads_beside
from .webdata import read_webdataset

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: a sha256 of the contents is stored with them; 3: the features of inference windows


# ---------------------------------------------------------------------------------------------- sources

def read_folder(root) -> ClipSet:
    """``ROOT/<class name>/**/<clip>``: one sub-folder per class, class names sorted. Symlinks that lead
    to no file are listed in ``skipped`` with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise AudioclfError(f"{root}: not a folder (format 'folder' wants ROOT/<class>/<clips>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
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


def _read_table(path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """(line number, row) of each row of a UTF-8 CSV that has the ``required`` columns."""
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


# One metadata row: audio file, class name, fold, group, line in the metadata file.
Row = tuple[Path, str, Optional[int], Optional[str], int]


def _one_row_per_file(rows: list[Row], source) -> list[Row]:
    """Rows with each file listed once. The same file (``a.wav`` and ``./a.wav`` count as one) listed
    again with the same label, fold and group is kept once, with a warning; with another label, fold or
    group it is an error: it would carry two answers, or be tested on what it was trained on."""
    by_file: dict[str, list[Row]] = {}
    for row in rows:
        if not row[1].strip():
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
    classes = classes or sorted({name for _, name, _, _, _ in rows})
    index = {name: i for i, name in enumerate(classes)}
    clips, skipped = [], []
    for path, name, fold, group, _ in rows:
        if source_exists(path):  # a file, or a tar member (cv's folds.csv of a shard set lists those)
            clips.append(Clip(os.path.realpath(path), index[name], fold, group))
        else:
            skipped.append((os.path.abspath(path), link_problem(path) or "file listed in the metadata is missing"))
    if skipped:
        log.warning("%d listed file(s) are missing, e.g. %s (%s); they are left out", len(skipped), *skipped[0])
    return ClipSet(clips, classes, skipped)


def read_csv(path) -> ClipSet:
    """A manifest with columns ``path,label`` and optional ``fold``, ``group``; relative paths resolve
    against the CSV's folder. The same file listed twice must have the same label, fold and group."""
    path = Path(path)
    items = []
    for line, r in _read_table(path, ["path", "label"]):
        if not (r["path"] or "").strip():
            raise AudioclfError(f"{path} line {line}: the path is empty; every row names an audio file")
        fold = _int(r["fold"], "fold", path) if r.get("fold") not in (None, "") else None
        items.append((path.parent / r["path"], r["label"] or "", fold, r.get("group") or None, line))
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
    counts = Counter(c.label for c in clipset.clips)
    if len(clipset.classes) < 2:
        raise AudioclfError(f"{where}: found {len(clipset.classes)} class(es) {clipset.classes}; a classifier "
                            f"needs at least 2 (one sub-folder or label value per class)")
    empty = [name for i, name in enumerate(clipset.classes) if counts[i] == 0]
    if empty:
        raise AudioclfError(f"{where}: class(es) {', '.join(empty)} have no readable clips; add clips or remove the class")


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
        train, val = group_split(rest, val_split, seed)
    if not train or not val:
        raise AudioclfError(f"the split leaves {len(train)} training and {len(val)} validation clips; both need "
                            f"clips (add data, or change val_fold/val_split)")
    in_train = Counter(c.label for c in train)
    unvalidated = sorted(set(in_train) - {c.label for c in val})
    if unvalidated:
        log.warning("class(es) %s have no validation clips, so validation says nothing about them (a class with "
                    "a single clip or recording can never be in validation); add clips to them",
                    ", ".join(f"{classes[k] if classes else f'label {k}'!r} ({in_train[k]} training clip(s))"
                              for k in unvalidated))
    return {"train": train, "val": val, "test": test}


def group_split(clips: Sequence[Clip], val_split: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Stratified by label, whole groups to one side; about ``val_split`` of the clips go to validation.
    A class with a single group stays in training: in validation the model could not have learnt it."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / val_split)))
    groups = [c.group if c.group is not None else c.path for c in clips]
    groups_of: dict[int, set] = {}
    for c, g in zip(clips, groups):
        groups_of.setdefault(c.label, set()).add(g)
    single = {label for label, g in groups_of.items() if len(g) == 1}
    pool = [i for i, c in enumerate(clips) if c.label not in single]
    for n_groups, where in ((len(set(groups)), ""), (len({groups[i] for i in pool}), " outside single-group classes")):
        if n_groups < n_splits:
            raise AudioclfError(f"only {n_groups} group(s){where}: too few for a {val_split:.0%} validation split "
                                f"that keeps groups apart; add data or give a val_fold")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(splitter.split(np.zeros(len(pool)), [clips[i].label for i in pool], [groups[i] for i in pool]))
    val = {pool[j] for j in val_idx}
    return [c for i, c in enumerate(clips) if i not in val], [clips[i] for i in sorted(val)]


def assign_folds(clips: Sequence[Clip], n_folds: int, seed: int) -> list[int]:
    """Fold 1..``n_folds`` of each clip: stratified by label, whole groups (a clip without one is its own
    group) in one fold, so cross-validation never tests on a recording it trained on."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [c.group if c.group is not None else c.path for c in clips]
    if n_folds < 2 or len(set(groups)) < n_folds:
        raise AudioclfError(f"n_folds={n_folds}: need at least 2 folds and no more folds than the "
                            f"{len(set(groups))} group(s) in the data")
    fold = np.zeros(len(clips), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(clips)), [c.label for c in clips], groups), 1):
        fold[test] = k
    return fold.tolist()


def write_folds(clipset: ClipSet, path, n_folds: int, seed: int) -> Path:
    """Write ``clipset`` with :func:`assign_folds`' folds as a CSV manifest (``path,label,fold,group``,
    the layout ``read_csv`` reads) and return its path."""
    path = Path(path)
    folds = assign_folds(clipset.clips, n_folds, seed)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # as read_csv reads it
        w = csv.writer(f)
        w.writerow(["path", "label", "fold", "group"])
        w.writerows([c.path, clipset.classes[c.label], k, c.group if c.group is not None else c.path]
                    for c, k in zip(clipset.clips, folds))
    log.info("no folds in the dataset: %d stratified group folds written to %s", n_folds, path)
    return path


# ---------------------------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("AUDIOCLF_CACHE", Path.home() / ".cache" / "audioclf"))


def cache_key(clips: Sequence[Clip], features: FeatureConfig) -> str:
    """Changes when any file (path, size, mtime) or feature setting changes."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(features)], sort_keys=True).encode())
    for c in clips:
        h.update(os.fsencode(c.path))  # bytes: a file name need not be valid UTF-8
        try:
            st = os.stat(c.path)
            h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"\0missing\n")
    return h.hexdigest()[:20]


def check_cache_dir(path) -> Path:
    """Create the feature cache folder ``path`` if needed and check that a file can be written in it.

    Called before any feature is computed, so a bad folder fails in a second, not after the whole build.

    Raises:
        AudioclfError: naming ``path``, when it is a file, lies under a file, or is not writable.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        raise AudioclfError(f"cache_dir {path}: is a file, not a folder; give a folder (--cache-dir)") from None
    except NotADirectoryError:
        raise AudioclfError(f"cache_dir {path}: lies under a file, so it cannot be a folder; give a folder "
                            f"(--cache-dir)") from None
    except OSError as e:
        raise AudioclfError(f"cache_dir {path}: cannot write the feature cache there ({e.strerror}); give a "
                            f"writable folder (--cache-dir)") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_orphans(cache_dir: Path) -> None:
    """Delete ``features-*.tmp<pid>`` files whose build process is gone (killed while writing)."""
    for p in cache_dir.glob("features-*.tmp*"):
        pid = p.suffix.removeprefix(".tmp")
        if pid.isdigit() and (int(pid) <= 0 or not _pid_alive(int(pid))):
            with contextlib.suppress(OSError):
                p.unlink()
                log.info("removed %s, left by a cache build that was killed (process %s)", p, pid)


def _checksum(frames: torch.Tensor, offsets: torch.Tensor, kept: torch.Tensor, skipped: list) -> str:
    h = hashlib.sha256()
    for t in (frames, offsets, kept):
        h.update(t.contiguous().numpy())
    h.update(json.dumps(skipped).encode())
    return h.hexdigest()


def _log_mels(logmel: LogMel, waves: list[tuple[int, torch.Tensor]], batch_size: int,
              device) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, features) of each (index, waveform): the features of its inference windows
    (``audio.inference_windows``, each peak-normalised alone), concatenated along time, so the cache
    holds exactly what prediction computes for the same samples.

    Windows go through ``logmel`` ``batch_size`` at a time, whichever clips they come from: memory is
    bounded by the batch (and the one clip being cut), never by clips x longest clip.
    """
    c = logmel.config
    todo = [(i, inference_windows(w, c.n_samples, default_hop(c.n_samples))) for i, w in waves]
    flat = [(i, win) for i, wins in todo for win in wins]  # views into the clips, no copies yet
    out: dict[int, list[torch.Tensor]] = {i: [] for i, _ in todo}
    for k in range(0, len(flat), batch_size):
        chunk = flat[k:k + batch_size]
        for (i, _), m in zip(chunk, logmel(torch.stack([win for _, win in chunk]).to(device)).cpu()):
            out[i].append(m)
    for i, _ in todo:
        yield i, torch.cat(out.pop(i), dim=1)


class _Decode(torch.utils.data.Dataset):
    """Decode + resample + pad, one clip per item, in DataLoader workers; errors come back as text."""

    def __init__(self, paths: Sequence[str], features: FeatureConfig):
        self.paths, self.features = paths, features

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            wave = load_audio(self.paths[i], self.features.sample_rate)
        except AudioclfError as e:
            return i, None, str(e)
        except Exception as e:  # a corrupt clip must never end a long cache build
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"
        if wave.shape[0] < self.features.n_samples:
            wave = fix_length(wave, self.features.n_samples)
        return i, torch.from_numpy(np.ascontiguousarray(wave)), None


def _identity(batch):
    return batch


class FeatureBank:
    """Features of every readable clip, concatenated along time: ``frames`` (n_mels, total) with
    ``offsets`` (clips + 1). Clip ``i`` is ``frames[:, offsets[i]:offsets[i+1]]``: the features of its
    inference windows (``audio.inference_windows``), ``n_frames`` each, one after the other."""

    def __init__(self, frames: torch.Tensor, offsets: torch.Tensor, clips: list[Clip],
                 skipped: list[tuple[str, str]], n_frames: int):
        self.frames, self.offsets, self.clips, self.skipped, self.n_frames = frames, offsets, clips, skipped, n_frames
        self.labels = torch.tensor([c.label for c in clips], dtype=torch.long)
        self.lengths = offsets[1:] - offsets[:-1]

    def __len__(self):
        return len(self.clips)

    def clip_frames(self, i: int) -> torch.Tensor:
        return self.frames[:, self.offsets[i]:self.offsets[i + 1]]

    def batch(self, indices: torch.Tensor, *, random_crop: bool = False,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n_mels, n_frames) features and (batch,) labels of clips ``indices``: of a long clip, one
        of its windows drawn at random (training) or the middle one."""
        windows = self.lengths[indices] // self.n_frames
        if random_crop:
            pick = (torch.rand(len(indices), generator=generator) * windows).long()
        else:
            pick = (windows - 1) // 2
        start = self.offsets[indices] + pick * self.n_frames
        x = torch.stack([self.frames[:, s:s + self.n_frames] for s in start.tolist()])
        return x, self.labels[indices]

    def indices(self, clips: Sequence[Clip]) -> torch.Tensor:
        """Rows of ``clips`` in this bank (each clip must be in it)."""
        row = {c.path: i for i, c in enumerate(self.clips)}
        return torch.tensor([row[c.path] for c in clips], dtype=torch.long)

    @classmethod
    def build(cls, clipset: ClipSet, features: FeatureConfig, *, cache_dir=None, device="cpu",
              num_workers: Optional[int] = None, strict: bool = False, quiet: bool = False,
              batch_size: int = 32) -> "FeatureBank":
        """Load features from the cache, or decode every clip and compute them (then cache them).

        A clip that cannot be decoded is listed in ``skipped`` with its reason, unless ``strict``.
        """
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        path = cache_dir / f"features-{cache_key(clipset.clips, features)}.pt"
        if path.is_file():
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
                if d.get("sha256") != _checksum(d["frames"], d["offsets"], d["kept"], d["skipped"]):
                    raise ValueError("its checksum does not match: the file changed after it was written")
                if not torch.isfinite(d["frames"]).all():
                    raise ValueError("it holds NaN or infinite features")
                clips = [clipset.clips[i] for i in d["kept"].tolist()]
                decode_skipped = [tuple(s) for s in d["skipped"]]
                bank = cls(d["frames"], d["offsets"], clips, clipset.skipped + decode_skipped, features.n_frames)
            except Exception as e:  # a damaged or altered cache is rebuilt, never trusted, never fatal
                log.warning("feature cache %s cannot be used (%s); rebuilding it", path, e)
            else:
                # A cache written by a lenient build still holds the clips strict mode must refuse.
                if strict and decode_skipped:
                    raise AudioclfError(f"unreadable clip (strict mode): {decode_skipped[0][1]}")
                log.info("feature cache hit: %s (%d clips)", path, len(clips))
                return bank

        check_cache_dir(cache_dir)
        _remove_orphans(cache_dir)
        logmel = LogMel(features).to(device)
        workers = auto_workers() if num_workers is None else num_workers
        # Its own generator: the base seed the loader draws for its workers must not come from (and
        # advance) the global RNG, or a cold cache would change the model's initialisation.
        loader = torch.utils.data.DataLoader(_Decode([c.path for c in clipset.clips], features), batch_size=batch_size,
                                             num_workers=workers, collate_fn=_identity, generator=torch.Generator())
        pieces: list[Optional[torch.Tensor]] = [None] * len(clipset.clips)
        skipped = []

        def skip(i: int, why: str) -> None:
            if strict:
                raise AudioclfError(f"unreadable clip (strict mode): {why}")
            log.warning("skipping clip: %s", why)
            skipped.append((clipset.clips[i].path, why))

        with tqdm(total=len(clipset.clips), desc="features", unit="clip", disable=True if quiet else None) as bar, \
                cpu_threads_beside(workers, torch.device(device)), torch.no_grad():
            for batch in loader:
                for i, _, err in batch:
                    if err is not None:
                        skip(i, err)
                for i, m in _log_mels(logmel, [(i, w) for i, w, _ in batch if w is not None], batch_size, device):
                    if torch.isfinite(m).all():
                        pieces[i] = m
                    else:
                        skip(i, f"{clipset.clips[i].path}: its features hold NaN or infinite values")
                bar.update(len(batch))
        kept = [i for i, p in enumerate(pieces) if p is not None]
        if not kept:
            raise AudioclfError("none of the clips could be read; see the warnings above for each file's reason")
        lengths = torch.tensor([pieces[i].shape[1] for i in kept])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        frames = torch.cat([pieces[i] for i in kept], dim=1)
        kept_t, skipped_l = torch.tensor(kept), [list(s) for s in skipped]
        try:
            with atomic_path(path) as tmp:
                torch.save({"frames": frames, "offsets": offsets, "kept": kept_t, "skipped": skipped_l,
                            "sha256": _checksum(frames, offsets, kept_t, skipped_l)}, tmp)
            log.info("feature cache written: %s", path)
        except (OSError, RuntimeError) as e:  # disk full (torch.save raises RuntimeError): train uncached
            log.warning("could not write the feature cache %s (%s); the next run will compute it again", path, e)
        return cls(frames, offsets, [clipset.clips[i] for i in kept], clipset.skipped + skipped, features.n_frames)
