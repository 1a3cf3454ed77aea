"""The sharded feature store: shards against one shard, resuming, damage, keys, memory, ranks."""

import functools
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import audioclf.store as store_module
from audioclf.config import AudioclfError, FeatureConfig
from audioclf.data import Clip, ClipSet
from audioclf.features import LogMel
from audioclf.store import FeatureBank, cache_key, shard_path, store_folder, write_manifest, write_shard
from conftest import tone

SR = 8000  # Hz
FEATURES = FeatureConfig(sample_rate=SR, duration_s=0.25)


class Tones(torch.utils.data.Dataset):
    """An audio source without files (what a tar-shard reader will be): clip ``i`` is a tone of its own
    pitch, 0.3-0.6 s long: 2 to 4 windows. ``seen`` records what was decoded; ``fail_at``
    raises ``error`` at that clip, as a crash or Ctrl-C in the middle of a build would."""

    def __init__(self, clips, features, seen=None, fail_at=None, error=RuntimeError):
        self.n, self.seen, self.fail_at, self.error = len(clips), seen, fail_at, error

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.seen is not None:
            self.seen.append(i)
        if i == self.fail_at:
            raise self.error(f"failed at clip {i}")
        return i, torch.from_numpy(tone(150.0 + 40 * i, SR, 0.3 + 0.1 * (i % 4))), None


def tone_clips(n: int) -> ClipSet:
    return ClipSet([Clip(f"/no/such/dir/tone{i:03d}.wav", i % 3) for i in range(n)], ["a", "b", "c"])


def build(clipset, cache_dir, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("source", Tones)
    return FeatureBank.build(clipset, FEATURES, cache_dir=cache_dir, quiet=True, **kw)


def same_features(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(a.clip_frames(i), b.clip_frames(i)) for i in range(len(a)))


def shard_files(cache_dir) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in Path(cache_dir).glob("features-*/shard-*")}


# ------------------------------------------------------------------------------------------ shards

def test_many_small_shards_give_what_one_shard_gives(tmp_path):
    cs = tone_clips(23)
    one = build(cs, tmp_path / "one")
    many = build(cs, tmp_path / "many", shard_clips=4)
    assert len(shard_files(tmp_path / "one")) == 2 and len(shard_files(tmp_path / "many")) == 12  # 6 shards
    assert many.clips == one.clips and torch.equal(many.labels, one.labels) and torch.equal(many.lengths, one.lengths)
    assert {n // FEATURES.n_frames for n in one.lengths.tolist()} == {2, 3, 4}  # windows per clip: crops differ
    assert same_features(many, one)
    for bank in (one, many):
        g = torch.Generator().manual_seed(5)
        bank.batches = [bank.batch(torch.randperm(23, generator=g)[:8], random_crop=True, generator=g) for _ in range(4)]
        bank.batches.append(bank.batch(torch.arange(23)))
    for (x1, y1), (x2, y2) in zip(one.batches, many.batches):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (23, FEATURES.n_mels, FEATURES.n_frames)


def test_the_store_holds_the_logmels_of_the_windows_and_loads_whole_on_request(tmp_path):
    cs = tone_clips(9)
    bank = build(cs, tmp_path, shard_clips=4)
    logmel = LogMel(FEATURES)
    for i in (0, 3, 6):
        wave = torch.from_numpy(tone(150.0 + 40 * i, SR, 0.3 + 0.1 * (i % 4)))
        windows = store_module.inference_windows(wave, FEATURES.n_samples, FEATURES.n_samples // 2)
        torch.testing.assert_close(bank.clip_frames(i), torch.cat([logmel(w) for w in windows], dim=1))
    g = torch.Generator().manual_seed(0)
    want = [bank.batch(torch.tensor([8, 1, 3, 3]), random_crop=True, generator=g) for _ in range(3)]
    clip = bank.clip_frames(7)
    assert bank.to_device("cpu", max_bytes=0) is False  # too large: stays on disk
    assert bank.to_device("cpu") is True
    g = torch.Generator().manual_seed(0)
    for x, y in want:
        x2, y2 = bank.batch(torch.tensor([8, 1, 3, 3]), random_crop=True, generator=g)
        assert torch.equal(x2, x) and torch.equal(y2, y)
    assert torch.equal(bank.clip_frames(7), clip)


def test_a_store_written_directly_opens_without_decoding(tmp_path):
    """What benchmarks/scale.py does: features from elsewhere, written through the store's writer."""
    cs = tone_clips(6)
    folder = store_folder(cs.clips, FEATURES, tmp_path, shard_clips=4)
    rng = np.random.default_rng(0)
    written = {}
    indexes = {}
    for k, clips in enumerate((range(0, 4), range(4, 6))):
        with write_shard(folder, k, FEATURES.n_mels) as shard:
            for i in clips:
                if i == 2:
                    shard.skip(i, "unreadable for the test")
                    continue
                written[i] = torch.from_numpy(rng.standard_normal((FEATURES.n_mels, FEATURES.n_frames * (1 + i % 2)),
                                                                  dtype=np.float32))
                shard.add(i, written[i])
        indexes[k] = shard.index
    write_manifest(folder, indexes, n_clips=6, shard_clips=4, n_frames=FEATURES.n_frames)
    seen = []
    bank = build(cs, tmp_path, shard_clips=4, source=functools.partial(Tones, seen=seen))
    assert seen == []
    assert [c.path for c in bank.clips] == [cs.clips[i].path for i in (0, 1, 3, 4, 5)]
    assert bank.skipped == [(cs.clips[2].path, "unreadable for the test")]
    for row, i in enumerate((0, 1, 3, 4, 5)):
        assert torch.equal(bank.clip_frames(row), written[i])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["version"], manifest["shards"], manifest["kept"]) == (4, 2, 5)
    with pytest.raises(ValueError, match=r"clip 0: features of shape \(3, 5\)"):
        with write_shard(folder, 9, FEATURES.n_mels) as shard:
            shard.add(0, torch.zeros(3, 5))
    assert not shard_path(folder, 9).exists() and not list(folder.glob(".*.tmp*"))


# ------------------------------------------------------------------------------------------ resume, damage

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_build_resumes_shard_by_shard(tmp_path, error):
    cs = tone_clips(14)  # shards of 4: 0-3, 4-7, 8-11, 12-13
    seen = []
    with pytest.raises(error, match="failed at clip 9"):
        build(cs, tmp_path, shard_clips=4, source=functools.partial(Tones, seen=seen, fail_at=9, error=error))
    before = shard_files(tmp_path)
    assert sorted(before) == ["shard-00000.json", "shard-00000.npy", "shard-00001.json", "shard-00001.npy"]
    (folder,) = tmp_path.glob("features-*")
    assert not list(folder.glob(".*")) and not (folder / "manifest.json").exists()  # no temp file, not complete
    seen.clear()
    bank = build(cs, tmp_path, shard_clips=4, source=functools.partial(Tones, seen=seen))
    assert seen == list(range(8, 14))  # only the shards that were not finished
    after = shard_files(tmp_path)
    for name, st in before.items():  # the finished shards were kept, not written again
        assert (after[name].st_ino, after[name].st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert (folder / "manifest.json").is_file()
    assert same_features(bank, build(cs, tmp_path / "uninterrupted", shard_clips=4))


def test_a_damaged_shard_is_named_and_rebuilt_alone(tmp_path, caplog):
    cs = tone_clips(12)
    first = build(cs, tmp_path, shard_clips=4)
    (folder,) = tmp_path.glob("features-*")
    damaged = shard_path(folder, 1)
    with open(damaged, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    seen = []
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        again = build(cs, tmp_path, shard_clips=4, source=functools.partial(Tones, seen=seen))
    assert f"feature store shard {damaged} cannot be used (its checksum does not match" in caplog.text
    assert shard_path(folder, 0).name not in caplog.text and shard_path(folder, 2).name not in caplog.text
    assert seen == [4, 5, 6, 7]
    assert same_features(again, first)
    # A damaged index is caught too.
    damaged.with_suffix(".json").write_text('{"version": 4, "shard": 1, "clips": [4]}')
    seen.clear()
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        assert same_features(build(cs, tmp_path, shard_clips=4, source=functools.partial(Tones, seen=seen)), first)
    assert "shard-00001.npy cannot be used (its index lacks n_mels, lengths, skipped, sha256)" in caplog.text
    assert seen == [4, 5, 6, 7]


def test_a_shard_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def disk_full(self, i, frames):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.ShardWriter, "add", disk_full)
    with pytest.raises(AudioclfError, match=r"cannot write the feature store shard .*shard-00000.npy \(No space left "
                                            r"on device\); free space there or give another --cache-dir"):
        build(tone_clips(5), tmp_path)


def test_the_key_follows_files_features_and_shard_size(tmp_path):
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"x")
    clips = [Clip(str(clip), 0), Clip(str(tmp_path / "b.wav"), 1)]
    key = cache_key(clips, FEATURES)
    assert cache_key(list(clips), FeatureConfig(sample_rate=SR, duration_s=0.25)) == key
    assert cache_key(clips, FeatureConfig(sample_rate=SR, duration_s=0.25, n_mels=64)) != key
    assert cache_key(clips, FEATURES, shard_clips=8) != key
    assert cache_key(clips[:1], FEATURES) != key
    clip.write_bytes(b"xy")
    assert cache_key(clips, FEATURES) != key


# ------------------------------------------------------------------------------------------ memory

def test_a_batch_maps_only_the_shards_it_reads(tmp_path, monkeypatch):
    cs = tone_clips(12)
    bank = build(cs, tmp_path, shard_clips=4)
    loads = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda path, **kw: (loads.append((Path(path).name, kw.get("mmap_mode"))),
                                                        real(path, **kw))[1])
    bank.batch(torch.tensor([5, 6]))
    bank.batch(torch.tensor([4, 9]))
    bank.clip_frames(7)
    assert loads == [("shard-00001.npy", "r"), ("shard-00002.npy", "r")]  # each mapped once, none read whole


def rss_file_mb() -> float:
    """File-backed resident memory of this process (memory-mapped pages), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_reading_a_large_store_keeps_resident_memory_flat(tmp_path):
    """Mapped pages count in a process's resident memory until unmapped: reading every clip of a 48 MB
    store raises it by 48 MB if the maps are kept, by at most about map_bytes if they are dropped."""
    features = FeatureConfig(sample_rate=SR, duration_s=1.0)  # 32 frames x 80 mels: 10 KB a clip
    cs = tone_clips(4800)
    folder = store_folder(cs.clips, features, tmp_path, shard_clips=1200)
    rng = np.random.default_rng(0)
    indexes = {}
    for k in range(4):
        block = torch.from_numpy(rng.standard_normal((features.n_mels, 1200 * features.n_frames), dtype=np.float32))
        with write_shard(folder, k, features.n_mels) as shard:
            for j, frames in enumerate(block.split(features.n_frames, dim=1)):
                shard.add(k * 1200 + j, frames)
        indexes[k] = shard.index
    write_manifest(folder, indexes, n_clips=len(cs.clips), shard_clips=1200, n_frames=features.n_frames)

    def growth_mb(map_bytes: int) -> float:
        bank = FeatureBank.build(cs, features, cache_dir=tmp_path, shard_clips=1200, quiet=True)
        assert bank.nbytes == 4800 * 32 * 80 * 4
        bank.map_bytes = map_bytes
        base = rss_file_mb()
        for i in range(0, len(bank), 16):
            bank.batch(torch.arange(i, i + 16))
        return rss_file_mb() - base

    kept = growth_mb(2**40)
    dropped = growth_mb(4 * 2**20)
    print(f"resident memory grew by {kept:.1f} MB with the maps kept, {dropped:.1f} MB with them dropped")
    assert kept > 40, f"{kept:.1f} MB: the test no longer sees mapped pages"
    assert dropped < 12, f"reading a 48 MB store in batches raised resident memory by {dropped:.1f} MB"


# ------------------------------------------------------------------------------------------ ranks

DIST_BUILD = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[4])
    from test_store import Tones, build, tone_clips
    import functools
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seen = []
    bank = build(tone_clips(10), sys.argv[5], shard_clips=2, distributed=True, source=functools.partial(Tones, seen=seen))
    digest = [float(bank.clip_frames(i).double().sum()) for i in range(len(bank))]
    dist.destroy_process_group()
    print(json.dumps({"seen": seen, "digest": digest}))
""")


@pytest.mark.slow
def test_ranks_build_their_own_shards_then_all_read_the_whole_store(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(store_module.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", DIST_BUILD, str(rank), "2", str(port), str(Path(__file__).parent),
                               str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # 5 shards of 2 clips: rank 0 builds shards 0, 2, 4 and rank 1 shards 1 and 3
    assert results[0]["seen"] == [0, 1, 4, 5, 8, 9] and results[1]["seen"] == [2, 3, 6, 7]
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["digest"] == [float(build(tone_clips(10), tmp_path / "one").clip_frames(i).double().sum())
                                    for i in range(10)]
