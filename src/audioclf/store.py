"""The feature store: the log-mels of every clip of a dataset, on disk in shards, read batch by batch.

Flow: ``FeatureBank.build`` (decode, resample and batched LogMel in worker processes, shard by shard, once
per dataset and feature config) -> ``FeatureBank.batch`` (crop the clips a batch asks for out of
memory-mapped shards, collate).

One store is a folder ``<cache_dir>/features-<key>/``:

- ``shard-00000.npy``: float32 ``(frames, n_mels)``, the features of clips ``0 .. shard_clips - 1``
  (those that could be read) one after the other, time-major, so that a window is one contiguous read;
- ``shard-00000.json``: its index: which clips it holds, their lengths in frames, the clips it skipped and
  why, and a sha256 of all of it; written after the frames, so a shard whose index exists is complete;
- ``manifest.json``: written last, once every shard is there.

Shards are the unit of work and of damage: an interrupted build resumes at the first missing shard, and a
shard that fails its checksum is rebuilt alone. Where a store lives and how its files are written and
checked is :mod:`audioclf.shards`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import default_hop, fix_length, inference_windows, load_audio
from .clips import Clip, ClipSet
from .config import FeatureConfig
from .errors import AudioclfError
from .features import LogMel
from .runtime import auto_workers, barrier, dying_with_parent
from .shards import (SHARD_CLIPS, ShardWriter, check_cache_dir, read_shard_index, remove_orphans, shard_path,
                     store_folder, write_manifest, write_shard)
from .shards import cache_key, default_cache_dir  # noqa: F401 (the store's API: where a store of clips lives)

log = logging.getLogger(__name__)

MAP_BYTES = 64 * 2**20  # bytes mapped in from a larger store before its memory maps are dropped
# A page fault on a mapped file maps up to this much of the page cache around it (Linux's fault-around),
# so reading a window maps its bytes plus up to this on each side.
_FAULT_AROUND = 64 * 2**10


# ---------------------------------------------------------------------------------------------- features

def _log_mels(logmel: LogMel, waves: list[tuple[int, torch.Tensor]], batch_size: int,
              device) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, features) of each (index, waveform): the features of its inference windows
    (``audio.inference_windows``, each peak-normalised alone), concatenated along time, so the store
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


class DecodeFiles(torch.utils.data.Dataset):
    """Decode + resample + pad, one clip per item: ``(i, waveform, None)``, or ``(i, None, why)`` when the
    file cannot be read. The builder's audio source: another one (e.g. audio from tar shards) is any
    Dataset over the same clip positions whose items have this form."""

    def __init__(self, clips: Sequence[Clip], features: FeatureConfig):
        self.paths, self.features = [c.path for c in clips], features

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            wave = load_audio(self.paths[i], self.features.sample_rate)
        except AudioclfError as e:
            return i, None, str(e)
        except Exception as e:  # a corrupt clip must never end a long build
            return i, None, f"{self.paths[i]}: {type(e).__name__}: {e}"
        if wave.shape[0] < self.features.n_samples:
            wave = fix_length(wave, self.features.n_samples)
        return i, torch.from_numpy(np.ascontiguousarray(wave)), None


class _Featurize:
    """DataLoader collate: a batch of decoded clips -> ``(i, features or None, why or None)`` per clip.

    On the CPU it runs in each worker process, one torch thread each (the DataLoader's default), so every
    worker turns its own clips into features and the build scales with the cores. Without ``logmel`` (a
    GPU build) it passes the waveforms on, for the main process to compute on the GPU.
    """

    def __init__(self, logmel: Optional[LogMel], paths: Sequence[str], batch_size: int):
        self.logmel, self.paths, self.batch_size = logmel, paths, batch_size

    def __call__(self, batch: list) -> list:
        return batch if self.logmel is None else _features_of(self.logmel, batch, self.paths, self.batch_size, "cpu")


@torch.no_grad()
def _features_of(logmel: LogMel, batch: list, paths: Sequence[str], batch_size: int, device) -> list:
    """``(i, features, None)`` for each decoded ``(i, wave, None)``, ``(i, None, why)`` for the others
    (a file that could not be read, or features that hold NaN or infinite values)."""
    done = {i: (None, why) for i, w, why in batch if w is None}
    for i, m in _log_mels(logmel, [(i, w) for i, w, _ in batch if w is not None], batch_size, device):
        done[i] = (m, None) if torch.isfinite(m).all() else (None, f"{paths[i]}: its features hold NaN or infinite values")
    return [(i, *done[i]) for i, _, _ in batch]


# ---------------------------------------------------------------------------------------------- the bank

def _dist_rank_world(distributed: bool) -> tuple[int, int]:
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FeatureBank:
    """The features of every readable clip of a dataset, read from a store's memory-mapped shards.

    Clip ``i`` (of ``clips``) has ``lengths[i]`` frames: the features of its inference windows
    (``audio.inference_windows``), ``n_frames`` each, one after the other. Only the frames a batch asks
    for are read; on a store larger than ``MAP_BYTES`` the memory maps are dropped whenever about
    ``MAP_BYTES`` may have been mapped in, so resident memory stays flat however large the dataset.
    :meth:`to_device` loads a small store whole (onto a GPU, or into RAM).
    """

    def __init__(self, folder: Path, clipset: ClipSet, indexes: dict[int, dict], n_frames: int, n_mels: int):
        self.folder, self.n_frames, self.n_mels = Path(folder), n_frames, n_mels
        self.clips, self.skipped = [], list(clipset.skipped)
        shard, start, lengths = [], [], []  # per clip: its shard, its first row there, its frames
        self._rows = {}  # per shard: its rows
        for k in sorted(indexes):
            self._rows[k] = 0
            for i, n in zip(indexes[k]["clips"], indexes[k]["lengths"]):
                self.clips.append(clipset.clips[i])
                shard.append(k)
                start.append(self._rows[k])
                lengths.append(n)
                self._rows[k] += n
            self.skipped += [(clipset.clips[i].path, why) for i, why in indexes[k]["skipped"]]
        self.labels = torch.tensor([c.label for c in self.clips], dtype=torch.long)
        # (clips, classes) multi-hot of every clip's classes, for multilabel training: several or none each
        self.targets = torch.zeros(len(self.clips), len(clipset.classes), dtype=torch.bool)
        self.targets[[i for i, c in enumerate(self.clips) for _ in c.targets], [t for c in self.clips for t in c.targets]] = True
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self._shard, self._start = np.array(shard, dtype=np.int64), np.array(start, dtype=np.int64)
        self.nbytes = sum(self._rows.values()) * n_mels * 4
        self.map_bytes = MAP_BYTES
        self._maps: dict[int, np.ndarray] = {}
        self._mapped_since_drop = 0
        self._frames: Optional[torch.Tensor] = None  # the whole store, after to_device
        self._offsets: Optional[np.ndarray] = None  # per clip: its first row in _frames
        self._rows_of: Optional[dict] = None

    def __len__(self):
        return len(self.clips)

    # ---- reading

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(shard_path(self.folder, k), mmap_mode="r")
        return self._maps[k]

    def _count(self, nbytes: int, reads: int) -> None:
        """Drop the memory maps once ``map_bytes`` may have been mapped in through them (``reads`` contiguous
        reads of ``nbytes`` in all): a mapped page stays in this process's resident set until it is unmapped,
        so without this an epoch over a large store would count all of it."""
        self._mapped_since_drop += nbytes + 2 * _FAULT_AROUND * reads
        if self.nbytes > self.map_bytes and self._mapped_since_drop > self.map_bytes:
            self._maps.clear()
            self._mapped_since_drop = 0

    def clip_frames(self, i: int) -> torch.Tensor:
        """``(n_mels, lengths[i])`` features of clip ``i``, read alone (a copy; a view when loaded whole)."""
        n = int(self.lengths[i])
        if self._frames is not None:
            s = int(self._offsets[i])
            return self._frames[s:s + n].T
        s = int(self._start[i])
        x = torch.from_numpy(self._map(int(self._shard[i]))[s:s + n].T.copy())  # a copy: no view keeps the map
        self._count(x.numel() * 4, 1)
        return x

    def batch(self, indices: torch.Tensor, *, random_crop: bool = False, generator: Optional[torch.Generator] = None,
              multi_hot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n_mels, n_frames) features and (batch,) labels of clips ``indices`` (``multi_hot``: their
        (batch, classes) float ``targets``): of a long clip, one of its windows drawn at random (training) or
        the middle one. On the device of :meth:`to_device`."""
        windows = self.lengths[indices] // self.n_frames
        if random_crop:
            pick = (torch.rand(len(indices), generator=generator) * windows).long()
        else:
            pick = (windows - 1) // 2
        first = pick * self.n_frames  # the window's first frame, within its clip
        if self._frames is not None and self._frames.device.type != "cpu":  # one gather on the GPU
            rows = (torch.from_numpy(self._offsets)[indices] + first)[:, None] + torch.arange(self.n_frames)
            x = self._frames[rows.to(self._frames.device)].transpose(1, 2).contiguous()
        else:
            x = torch.from_numpy(self._read(torch.as_tensor(indices).tolist(), first.tolist()))
        return x, self.targets[indices].float() if multi_hot else self.labels[indices]

    def _read(self, indices: list[int], first: list[int]) -> np.ndarray:
        """(batch, n_mels, n_frames) windows, each copied (and transposed) once, from RAM or the maps."""
        out = np.empty((len(indices), self.n_mels, self.n_frames), dtype=np.float32)
        whole = None if self._frames is None else self._frames.numpy()
        for row, (i, f) in enumerate(zip(indices, first)):
            if whole is None:
                src, s = self._map(int(self._shard[i])), int(self._start[i]) + f
            else:
                src, s = whole, int(self._offsets[i]) + f
            out[row] = src[s:s + self.n_frames].T
        if whole is None:
            self._count(out.nbytes, len(indices))
        return out

    def indices(self, clips: Sequence[Clip]) -> torch.Tensor:
        """Rows of ``clips`` in this bank (each clip must be in it)."""
        if self._rows_of is None:
            self._rows_of = {c.path: i for i, c in enumerate(self.clips)}
        return torch.tensor([self._rows_of[c.path] for c in clips], dtype=torch.long)

    def to_device(self, device, *, max_bytes: int = 4 * 2**30) -> bool:
        """Load the whole store onto ``device`` (a GPU, so batches never cross PCIe; or ``cpu``: into RAM)
        when it holds at most ``max_bytes``; batches and clip frames then come from there. Host memory
        meanwhile: one shard. Returns whether it was loaded."""
        if self.nbytes > max_bytes:
            log.info("feature store %s: %.1f GB, more than %.1f GB: batches are read from disk", self.folder,
                     self.nbytes / 1e9, max_bytes / 1e9)
            return False
        frames = torch.empty(sum(self._rows.values()), self.n_mels, dtype=torch.float32, device=device)
        base, row = {}, 0
        for k in sorted(self._rows):
            base[k], n = row, self._rows[k]
            if n:
                frames[row:row + n].copy_(torch.from_numpy(np.load(shard_path(self.folder, k))))
            row += n
        self._frames = frames
        self._offsets = np.array([base[k] for k in self._shard], dtype=np.int64) + self._start
        self._maps.clear()
        return True

    # ---- building

    @classmethod
    def build(cls, clipset: ClipSet, features: FeatureConfig, *, cache_dir=None, device="cpu",
              num_workers: Optional[int] = None, strict: bool = False, quiet: bool = False,
              batch_size: int = 32, shard_clips: int = SHARD_CLIPS, distributed: bool = False,
              source: Callable[[Sequence[Clip], FeatureConfig], torch.utils.data.Dataset] = DecodeFiles) -> "FeatureBank":
        """Open the store of ``clipset`` with ``features``, building the shards it lacks first.

        Every shard is checked against its checksum; a damaged one is named in a warning and rebuilt, and
        an interrupted build resumes with the shards it had not finished. A clip that cannot be read is
        listed in ``skipped`` with its reason, unless ``strict``.

        Args:
            clipset: the dataset; shard ``k`` holds its clips ``k * shard_clips`` to ``(k + 1) * shard_clips - 1``.
            features: the feature settings (part of the store's key).
            cache_dir: where stores live (default: ``$AUDIOCLF_CACHE`` or ``~/.cache/audioclf``).
            device: where LogMel runs. On ``cpu`` each worker process decodes and computes its own clips'
                features; on a GPU the workers decode and the main process computes.
            num_workers: worker processes (default: ``runtime.auto_workers``, every core on the CPU).
            batch_size: clips per worker task, and windows per LogMel call.
            shard_clips: clips per shard (part of the key).
            distributed: under ``torch.distributed`` with several processes, rank ``r`` builds shards
                ``r, r + world, ...``, waits for the others, then opens the whole store; every rank must call.
            source: ``source(clips, features)`` -> the Dataset that decodes them (see :class:`DecodeFiles`).
        """
        folder = store_folder(clipset.clips, features, cache_dir, shard_clips)
        n_shards = math.ceil(len(clipset.clips) / shard_clips)
        rank, world = _dist_rank_world(distributed)
        indexes = _check_shards(folder, range(n_shards), features.n_mels) if folder.is_dir() else {}
        todo = [k for k in range(n_shards) if k not in indexes]
        if todo:
            check_cache_dir(folder.parent)
            folder.mkdir(exist_ok=True)
            if rank == 0:
                remove_orphans(folder)
            if indexes:
                log.info("feature store %s: %d of %d shards are there; building the other %d", folder,
                         len(indexes), n_shards, len(todo))
        # The barriers are unconditional, so that ranks match them even if they saw the store differently.
        if world > 1:
            barrier(torch.device(device))  # no rank writes before the orphans are gone
        builder = _Builder(folder, clipset, features, device, num_workers, strict, quiet, batch_size, shard_clips, source)
        indexes.update(builder.run([k for k in todo if k % world == rank]))
        if world > 1:
            barrier(torch.device(device))
            indexes.update(_check_shards(folder, [k for k in todo if k not in indexes], features.n_mels))
            indexes.update(builder.run([k for k in todo if k not in indexes]))  # those a failed rank left
        if todo:
            write_manifest(folder, indexes, n_clips=len(clipset.clips), shard_clips=shard_clips, n_frames=features.n_frames)
        bank = cls(folder, clipset, indexes, features.n_frames, features.n_mels)
        if not bank.clips:
            raise AudioclfError("none of the clips could be read; see the warnings above for each file's reason")
        decode_skipped = bank.skipped[len(clipset.skipped):]
        if strict and decode_skipped:  # a store built leniently still holds the clips strict mode refuses
            raise AudioclfError(f"unreadable clip (strict mode): {decode_skipped[0][1]}")
        log.info("feature store %s: %d clips in %d shard(s), %.0f MB", folder, len(bank), n_shards, bank.nbytes / 1e6)
        return bank


def _check_shards(folder: Path, shards: Iterable[int], n_mels: int) -> dict[int, dict]:
    """The indexes of ``shards`` that are finished and sound; a damaged one is deleted, with a warning."""
    found = {}
    for k in shards:
        try:
            found[k] = read_shard_index(folder, k, n_mels)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or altered: rebuilt, never trusted
            log.warning("feature store shard %s cannot be used (%s); rebuilding it", shard_path(folder, k), e)
            for p in (shard_path(folder, k).with_suffix(".json"), shard_path(folder, k)):
                p.unlink(missing_ok=True)
    return found


class _Builder:
    """Decodes and featurises the clips of some shards with worker processes and writes the shards in order."""

    def __init__(self, folder, clipset, features, device, num_workers, strict, quiet, batch_size, shard_clips, source):
        self.folder, self.clipset, self.features, self.strict, self.quiet = folder, clipset, features, strict, quiet
        self.device, self.batch_size, self.shard_clips, self.source = torch.device(device), batch_size, shard_clips, source
        on_cpu = self.device.type == "cpu"
        # On the CPU the main process only writes, so every core gets a worker; a GPU build keeps one for
        # the main process, which feeds the GPU.
        self.workers = auto_workers(main_process_busy=not on_cpu) if num_workers is None else num_workers

    def _shard_batches(self, k: int) -> list[list[int]]:
        n = len(self.clipset.clips)
        clips = range(k * self.shard_clips, min(n, (k + 1) * self.shard_clips))
        return [list(clips[j:j + self.batch_size]) for j in range(0, len(clips), self.batch_size)]

    def run(self, shards: list[int]) -> dict[int, dict]:
        if not shards:
            return {}
        paths = [c.path for c in self.clipset.clips]
        logmel = LogMel(self.features).to(self.device)
        in_workers = self.device.type == "cpu"
        batches = {k: self._shard_batches(k) for k in shards}
        # Its own generator: the base seed the loader draws for its workers must not come from (and
        # advance) the global RNG, or a cold store would change the model's initialisation.
        loader = torch.utils.data.DataLoader(
            self.source(self.clipset.clips, self.features), batch_sampler=[b for k in shards for b in batches[k]],
            num_workers=self.workers, collate_fn=_Featurize(logmel if in_workers else None, paths, self.batch_size),
            generator=torch.Generator(), worker_init_fn=dying_with_parent())
        done = {}
        total = sum(len(b) for k in shards for b in batches[k])
        with tqdm(total=total, desc="features", unit="clip", disable=True if self.quiet else None) as bar:
            it = iter(loader)
            try:
                for k in shards:
                    try:
                        with write_shard(self.folder, k, self.features.n_mels) as shard:
                            for _ in batches[k]:
                                batch = next(it)
                                if not in_workers:
                                    batch = _features_of(logmel, batch, paths, self.batch_size, self.device)
                                for i, m, why in batch:
                                    self._add(shard, i, m, why)
                                bar.update(len(batch))
                    except OSError as e:
                        raise AudioclfError(f"cannot write the feature store shard {shard_path(self.folder, k)} "
                                            f"({e.strerror or e}); free space there or give another --cache-dir. "
                                            f"The finished shards are kept: the next run resumes") from None
                    done[k] = shard.index
            finally:
                del it  # stops the worker processes now, even while an exception travels up
        return done

    def _add(self, shard: ShardWriter, i: int, m: Optional[torch.Tensor], why: Optional[str]) -> None:
        if m is not None:
            shard.add(i, m)
            return
        if self.strict:
            raise AudioclfError(f"unreadable clip (strict mode): {why}")
        log.warning("skipping clip: %s", why)
        shard.skip(i, why)
