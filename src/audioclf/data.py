"""Datasets: where clips come from, how they are split, and the log-mel cache the trainer reads.

Flow: ``load_clips`` (folder / csv / esc50 / urbansound8k) -> ``FeatureBank.build`` (decode, resample,
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
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import AUDIO_EXTENSIONS, fix_length, load_audio
from .config import AudioclfError, DataConfig, FeatureConfig
from .features import LogMel

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class Clip:
    path: str  # absolute path of the audio file
    label: int  # index into the dataset's class names
    fold: Optional[int] = None  # official fold, where the dataset has them
    group: Optional[str] = None  # source recording; clips of one group never straddle a split


@dataclass
class ClipSet:
    clips: list[Clip]
    classes: list[str]  # label index -> class name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out

    def describe(self, clips: Optional[Sequence[Clip]] = None) -> str:
        clips = self.clips if clips is None else clips
        groups = {c.group if c.group is not None else c.path for c in clips}
        return f"{len(clips)} clips, {len({c.label for c in clips})} classes, {len(groups)} groups"


# ---------------------------------------------------------------------------------------------- sources

def read_folder(root) -> ClipSet:
    """``ROOT/<class name>/**/<clip>``: one sub-folder per class, class names sorted."""
    root = Path(root)
    if not root.is_dir():
        raise AudioclfError(f"{root}: not a folder (format 'folder' wants ROOT/<class>/<clips>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes, clips = [], []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            log.warning("%s: class folder holds no audio files (%s); left out", d, ", ".join(AUDIO_EXTENSIONS))
            continue
        clips += [Clip(str(f.resolve()), len(classes)) for f in files]
        classes.append(d.name)
    return ClipSet(clips, classes)


def _read_table(path, required: Sequence[str]) -> list[dict]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except OSError as e:
        raise AudioclfError(f"{path}: cannot read the CSV ({e.strerror})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise AudioclfError(f"{path}: missing column(s) {', '.join(missing)}; "
                            f"needed: {', '.join(required)}; found: {', '.join(columns) or 'no rows'}")
    return rows


def _int(value, what: str, path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AudioclfError(f"{path}: {what}={value!r} is not an integer") from None


def _from_rows(items: list[tuple[Path, str, Optional[int], Optional[str]]], classes: Optional[list[str]] = None) -> ClipSet:
    """Rows of (path, class name, fold, group) -> ClipSet; rows whose file is missing are reported."""
    classes = classes or sorted({name for _, name, _, _ in items})
    index = {name: i for i, name in enumerate(classes)}
    clips, skipped = [], []
    for path, name, fold, group in items:
        if path.is_file():
            clips.append(Clip(str(path.resolve()), index[name], fold, group))
        else:
            skipped.append((str(path), "file listed in the metadata is missing"))
    if skipped:
        log.warning("%d listed file(s) are missing, e.g. %s; they are left out", len(skipped), skipped[0][0])
    return ClipSet(clips, classes, skipped)


def read_csv(path) -> ClipSet:
    """A manifest with columns ``path,label`` and optional ``fold``, ``group``; relative paths resolve
    against the CSV's folder."""
    path = Path(path)
    rows = _read_table(path, ["path", "label"])
    items = []
    for r in rows:
        fold = _int(r["fold"], "fold", path) if r.get("fold") not in (None, "") else None
        items.append((path.parent / r["path"], r["label"], fold, r.get("group") or None))
    return _from_rows(items)


def read_esc50(root, esc10: bool = False) -> ClipSet:
    """ESC-50: ``audio/`` + ``meta/esc50.csv``; labels from ``category`` (remapped to 0..K-1 in the order
    of ESC-50's ``target``), ``group`` = ``src_file`` (clips cut from one recording stay together)."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    rows = _read_table(meta, ["filename", "fold", "target", "category", "esc10", "src_file"])
    if esc10:
        rows = [r for r in rows if r["esc10"].strip().lower() in ("true", "1")]
        if not rows:
            raise AudioclfError(f"{meta}: no row has esc10=True, so the --esc10 subset is empty")
    by_target = {_int(r["target"], "target", meta): r["category"] for r in rows}
    classes = [by_target[t] for t in sorted(by_target)]
    items = [(root / "audio" / r["filename"], r["category"], _int(r["fold"], "fold", meta), r["src_file"])
             for r in rows]
    return _from_rows(items, classes)


def read_urbansound8k(root) -> ClipSet:
    """UrbanSound8K: ``audio/foldN/`` + ``metadata/UrbanSound8K.csv``; ``group`` = ``fsID``."""
    root = Path(root)
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = _read_table(meta, ["slice_file_name", "fsID", "fold", "classID", "class"])
    by_id = {_int(r["classID"], "classID", meta): r["class"] for r in rows}
    classes = [by_id[i] for i in sorted(by_id)]
    items = [(root / "audio" / f"fold{r['fold']}" / r["slice_file_name"], r["class"],
              _int(r["fold"], "fold", meta), r["fsID"]) for r in rows]
    return _from_rows(items, classes)


def load_clips(config: DataConfig) -> ClipSet:
    """Read the dataset ``config`` describes and check it can train a classifier."""
    if not config.root:
        raise AudioclfError("no dataset given: pass the data folder or CSV (DataConfig.root)")
    readers = {"folder": read_folder, "csv": read_csv, "urbansound8k": read_urbansound8k,
               "esc50": lambda root: read_esc50(root, config.esc10)}
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
                val_split: float = 0.2, seed: int = 42) -> dict[str, list[Clip]]:
    """Split into ``train``/``val``/``test``.

    ``test_fold`` and ``val_fold`` take whole folds. Without ``val_fold``, validation is a stratified
    ``val_split`` fraction of the remaining clips chosen by whole groups (``StratifiedGroupKFold``), so
    clips cut from one recording never straddle train and validation.
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
    return {"train": train, "val": val, "test": test}


def group_split(clips: Sequence[Clip], val_split: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Stratified by label, whole groups to one side; about ``val_split`` of the clips go to validation."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / val_split)))
    labels = np.array([c.label for c in clips])
    groups = np.array([c.group if c.group is not None else c.path for c in clips])
    if len(set(groups)) < n_splits:
        raise AudioclfError(f"only {len(set(groups))} group(s): too few for a {val_split:.0%} validation split "
                            f"that keeps groups apart; add data or give a val_fold")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(clips)), labels, groups))
    return [clips[i] for i in train_idx], [clips[i] for i in val_idx]


# ---------------------------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("AUDIOCLF_CACHE", Path.home() / ".cache" / "audioclf"))


def cache_key(clips: Sequence[Clip], features: FeatureConfig) -> str:
    """Changes when any file (path, size, mtime) or feature setting changes."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(features)], sort_keys=True).encode())
    for c in clips:
        try:
            st = os.stat(c.path)
            h.update(f"{c.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{c.path}\0missing\n".encode())
    return h.hexdigest()[:20]


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


@contextlib.contextmanager
def _cpu_threads_beside(workers: int, device: torch.device):
    """Leave the decoding workers their cores: on 2 cores, 2 STFT threads beside 1 decoding worker made
    the cache build 1.6x slower than 1 thread (benchmarks/speed.py, extract_clips_per_s_1thread)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def auto_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


class FeatureBank:
    """Log-mel features of every readable clip, concatenated along time: ``frames`` (n_mels, total)
    with ``offsets`` (clips + 1). Clip ``i`` is ``frames[:, offsets[i]:offsets[i+1]]``, at least
    ``n_frames`` long (short clips are zero-padded before the STFT)."""

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
        """(batch, n_mels, n_frames) features and (batch,) labels of clips ``indices``; clips longer than
        ``n_frames`` are cropped at a random offset (training) or at the centre."""
        excess = self.lengths[indices] - self.n_frames
        if random_crop:
            start = (torch.rand(len(indices), generator=generator) * (excess + 1)).long()
        else:
            start = excess // 2
        start = start + self.offsets[indices]
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
                clips = [clipset.clips[i] for i in d["kept"].tolist()]
                decode_skipped = [tuple(s) for s in d["skipped"]]
                bank = cls(d["frames"], d["offsets"], clips, clipset.skipped + decode_skipped, features.n_frames)
            except Exception as e:  # a damaged cache is rebuilt, never fatal
                log.warning("feature cache %s unreadable (%s); rebuilding", path, e)
            else:
                # A cache written by a lenient build still holds the clips strict mode must refuse.
                if strict and decode_skipped:
                    raise AudioclfError(f"unreadable clip (strict mode): {decode_skipped[0][1]}")
                log.info("feature cache hit: %s (%d clips)", path, len(clips))
                return bank

        logmel = LogMel(features).to(device)
        workers = auto_workers() if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(_Decode([c.path for c in clipset.clips], features), batch_size=batch_size,
                                             num_workers=workers, collate_fn=_identity)
        pieces: list[Optional[torch.Tensor]] = [None] * len(clipset.clips)
        skipped = []
        with tqdm(total=len(clipset.clips), desc="features", unit="clip", disable=True if quiet else None) as bar, \
                _cpu_threads_beside(workers, torch.device(device)):
            for batch in loader:
                good = [(i, w) for i, w, _ in batch if w is not None]
                for i, _, err in batch:
                    if err is not None:
                        if strict:
                            raise AudioclfError(f"unreadable clip (strict mode): {err}")
                        log.warning("skipping clip: %s", err)
                        skipped.append((clipset.clips[i].path, err))
                if good:
                    n = max(w.shape[0] for _, w in good)
                    waves = torch.stack([torch.nn.functional.pad(w, (0, n - w.shape[0])) for _, w in good]).to(device)
                    with torch.no_grad():
                        mels = logmel(waves).cpu()
                    # Zero-padding then trimming is exact: the STFT pads each clip's end with zeros anyway.
                    for (i, w), m in zip(good, mels):
                        pieces[i] = m[:, : 1 + w.shape[0] // features.hop_length].clone()
                bar.update(len(batch))
        kept = [i for i, p in enumerate(pieces) if p is not None]
        if not kept:
            raise AudioclfError("none of the clips could be read; see the warnings above for each file's reason")
        lengths = torch.tensor([pieces[i].shape[1] for i in kept])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        frames = torch.cat([pieces[i] for i in kept], dim=1)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"frames": frames, "offsets": offsets, "kept": torch.tensor(kept), "skipped": [list(s) for s in skipped]}, tmp)
        os.replace(tmp, path)
        log.info("feature cache written: %s", path)
        return cls(frames, offsets, [clipset.clips[i] for i in kept], clipset.skipped + skipped, features.n_frames)
