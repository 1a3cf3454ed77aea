"""The feature store's files on disk (see :mod:`audioclf.store` for the store itself): where a store lives
(``<cache_dir>/features-<key>/``, the key a hash of the clips and the feature config), its shards (frames
and a checksummed index each, written atomically) and its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .audio import source_stat
from .clips import Clip
from .config import FeatureConfig
from .errors import AudioclfError
from .fileio import atomic_path

log = logging.getLogger(__name__)

# 2: a sha256 of the contents is stored with them; 3: the features of inference windows; 4: sharded and
# memory-mapped, one checksum per shard
CACHE_VERSION = 4
SHARD_CLIPS = 1024  # clips per shard: ~140 MB of 5-s clips, and a dataset of up to 1024 clips is one shard
_HEADER_BYTES = 128  # a .npy header of any 2-D float32 shape (numpy pads it to a multiple of 64)


# ---------------------------------------------------------------------------------------------- where

def default_cache_dir() -> Path:
    return Path(os.environ.get("AUDIOCLF_CACHE", Path.home() / ".cache" / "audioclf"))


def cache_key(clips: Sequence[Clip], features: FeatureConfig, shard_clips: int = SHARD_CLIPS) -> str:
    """Changes when any file (path, size, mtime), feature setting or the shard size changes."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(features), shard_clips], sort_keys=True).encode())
    for c in clips:
        h.update(os.fsencode(c.path))  # bytes: a file name need not be valid UTF-8
        try:
            st = source_stat(c.path)  # a tar member: its size and its tar's mtime
            h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"\0missing\n")
    return h.hexdigest()[:20]


def store_folder(clips: Sequence[Clip], features: FeatureConfig, cache_dir=None, shard_clips: int = SHARD_CLIPS) -> Path:
    """The folder that holds (or will hold) the store of ``clips`` with ``features``."""
    return Path(cache_dir or default_cache_dir()) / f"features-{cache_key(clips, features, shard_clips)}"


def shard_path(folder: Path, k: int) -> Path:
    """Shard ``k``'s frames; its index is the same name with ``.json``."""
    return Path(folder) / f"shard-{k:05d}.npy"


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


def remove_orphans(folder: Path) -> None:
    """Delete the temporary files (``.<name>.tmp<pid>``) of builds whose process is gone (killed while writing)."""
    for p in folder.glob(".*.tmp*"):
        pid = p.suffix.removeprefix(".tmp")
        if pid.isdigit() and (int(pid) <= 0 or not _pid_alive(int(pid))):
            with contextlib.suppress(OSError):
                p.unlink()
                log.info("removed %s, left by a feature build that was killed (process %s)", p, pid)


# ---------------------------------------------------------------------------------------------- shards

def _npy_header(rows: int, n_mels: int) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (rows, n_mels)})
    if out.tell() != _HEADER_BYTES:  # a numpy whose padding rule changed: the reserved space would not fit
        raise RuntimeError(f"numpy wrote a {out.tell()}-byte .npy header; the store reserves {_HEADER_BYTES}")
    return out.getvalue()


def _digest(data_sha256: str, index: dict) -> str:
    """The sha256 that binds a shard's frames to its index: either changed on disk fails it."""
    fields = [index[k] for k in ("version", "shard", "n_mels", "clips", "lengths", "skipped")]
    return hashlib.sha256(json.dumps([data_sha256, fields]).encode()).hexdigest()


class ShardWriter:
    """The clips of one shard, written to disk as they come (memory: one clip, whatever the shard's size).

    Use through :func:`write_shard`; ``add`` a clip's features or ``skip`` it with the reason, in clip order.
    """

    def __init__(self, file, k: int, n_mels: int):
        self._file, self._sha = file, hashlib.sha256()
        self.index = {"version": CACHE_VERSION, "shard": k, "n_mels": n_mels, "clips": [], "lengths": [], "skipped": []}

    def add(self, i: int, frames: torch.Tensor) -> None:
        """Clip ``i`` (its position in the dataset's clip list): features ``(n_mels, frames)``, float32."""
        n_mels = self.index["n_mels"]
        if frames.ndim != 2 or frames.shape[0] != n_mels:
            raise ValueError(f"clip {i}: features of shape {tuple(frames.shape)}, the shard holds ({n_mels}, frames)")
        data = np.ascontiguousarray(frames.detach().cpu().numpy().T, dtype="<f4")
        self._file.write(data)
        self._sha.update(data)
        self.index["clips"].append(i)
        self.index["lengths"].append(data.shape[0])

    def skip(self, i: int, why: str) -> None:
        self.index["skipped"].append([i, why])


@contextlib.contextmanager
def write_shard(folder: Path, k: int, n_mels: int) -> Iterator[ShardWriter]:
    """Write shard ``k`` of the store in ``folder``: the frames, then its index, each atomically.

    An exception (or Ctrl-C) inside the block leaves no file and no temporary file behind.
    """
    path = shard_path(folder, k)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_npy_header(0, n_mels))  # the real header, of the same size, once the length is known
        shard = ShardWriter(f, k, n_mels)
        yield shard
        f.seek(0)
        f.write(_npy_header(sum(shard.index["lengths"]), n_mels))
    shard.index["sha256"] = _digest(shard._sha.hexdigest(), shard.index)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(shard.index))


def read_shard_index(folder: Path, k: int, n_mels: int) -> dict:
    """Shard ``k``'s index, after reading its frames once to check them against it.

    Raises:
        FileNotFoundError: the shard was never finished.
        ValueError: saying what is wrong (checksum, header, NaN or infinite values).
    """
    path = shard_path(folder, k)
    index = json.loads(path.with_suffix(".json").read_text())
    if not isinstance(index, dict) or index.get("version") != CACHE_VERSION or index.get("shard") != k:
        raise ValueError(f"its index is not a version-{CACHE_VERSION} index of shard {k}")
    missing = [key for key in ("n_mels", "clips", "lengths", "skipped", "sha256") if key not in index]
    if missing:
        raise ValueError(f"its index lacks {', '.join(missing)}")
    sha, finite = hashlib.sha256(), True
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        if (shape, fortran, dtype.str) != ((sum(index["lengths"]), n_mels), False, "<f4"):
            raise ValueError(f"its frames are {dtype.str} {shape}, its index says <f4 ({sum(index['lengths'])}, {n_mels})")
        while chunk := f.read(4 * 2**20):  # reads, not a memory map: checking a large store leaves RSS alone
            sha.update(chunk)
            finite = finite and bool(np.isfinite(np.frombuffer(chunk, "<f4")).all())
    if index.get("sha256") != _digest(sha.hexdigest(), index):
        raise ValueError("its checksum does not match: the shard changed after it was written")
    if not finite:
        raise ValueError("it holds NaN or infinite features")
    return index


def write_manifest(folder: Path, indexes: dict[int, dict], *, n_clips: int, shard_clips: int, n_frames: int) -> None:
    """The store's summary, written when every shard is there (a store without one was interrupted)."""
    n_mels = next(iter(indexes.values()))["n_mels"] if indexes else 0
    manifest = {"version": CACHE_VERSION, "clips": n_clips, "shard_clips": shard_clips, "shards": len(indexes),
                "n_mels": n_mels, "n_frames": n_frames, "kept": sum(len(x["clips"]) for x in indexes.values()),
                "frames": sum(sum(x["lengths"]) for x in indexes.values())}
    with atomic_path(Path(folder) / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
