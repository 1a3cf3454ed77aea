"""Scale: the feature store's memory and speed as a dataset grows, and feature extraction against cores.

    python benchmarks/scale.py            # everything below (about 3 min on 2 CPU cores)
    python benchmarks/scale.py --quick    # tiny sizes: a smoke check, not figures (about 30 s)
    python benchmarks/scale.py --json     # one JSON object instead of the tables

rss       peak RSS of a training-like process (open the store, fit the normalisation on every clip, then
          batches through a small model step) on stores of 2k, 20k and 100k short clips (0.5 s: 80 x 44
          frames, 14 KB each), once reading batches from the memory-mapped shards (the store) and once with
          the whole store loaded into one tensor in RAM first (the old cache; ``FeatureBank.to_device("cpu")``).
          Each case runs in a fresh process and reads its own high-water mark (VmHWM). The stores are written
          directly from random features through the store's writer: decoding 122k files would take ~10 min here.
share     the data path (``FeatureBank.batch`` with random crops, then SpecAugment and mixup, batch 16) as a
          share of a ResNet-18 training step (``speed.bench_model``: as the trainer runs it) on 2,000 5-s clips
          (80 x 431, ESC-50's size: two shards, larger than ``store.MAP_BYTES``), the store against RAM.
extract   feature extraction (``FeatureBank.build`` into a fresh store, default workers) of generated 5-s
          44.1 kHz WAVs, in a fresh process restricted to 1, 2 and all cores (CPU affinity), and the scaling:
          clips/s on all cores / (cores x clips/s on one), 1.0 being linear.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from audioclf.config import FeatureConfig, resolve
from audioclf.data import Clip, ClipSet
from audioclf.runtime import cpu_cores
from audioclf.store import SHARD_CLIPS, FeatureBank, store_folder, write_manifest, write_shard

log = logging.getLogger("scale")
SHORT = FeatureConfig(duration_s=0.5)  # 80 mels x 44 frames: short clips keep 100k of them quick
N_CLASSES = 10


# ---------------------------------------------------------------------------------------------- stores

def synthetic_clipset(n: int) -> ClipSet:
    """``n`` clips that exist only in the store (their files are missing, which the store's key allows)."""
    return ClipSet([Clip(f"/synthetic/clip{i:06d}.wav", i % N_CLASSES) for i in range(n)],
                   [f"class{k}" for k in range(N_CLASSES)])


def write_synthetic_store(n: int, features: FeatureConfig, cache_dir: Path) -> Path:
    """The store of ``synthetic_clipset(n)``: one window of random features per clip, shard by shard."""
    clipset, rng = synthetic_clipset(n), np.random.default_rng(n)
    folder = store_folder(clipset.clips, features, cache_dir)
    indexes = {}
    for k, start in enumerate(range(0, n, SHARD_CLIPS)):
        count = min(SHARD_CLIPS, n - start)
        block = torch.from_numpy(rng.random((features.n_mels, count * features.n_frames), dtype=np.float32))
        with write_shard(folder, k, features.n_mels) as shard:
            for j, frames in enumerate(block.split(features.n_frames, dim=1)):
                shard.add(start + j, frames)
        indexes[k] = shard.index
    write_manifest(folder, indexes, n_clips=n, shard_clips=SHARD_CLIPS, n_frames=features.n_frames)
    return folder


def vm_hwm_mb() -> float:
    """This process's peak resident memory (MB = 10**6 bytes), counted from its exec, not from its parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


# ---------------------------------------------------------------------------------------------- rss

def child_rss(n: int, cache_dir: str, in_memory: bool, batches: int) -> dict:
    """In a fresh process: the training-like loop over the store of ``n`` synthetic short clips."""
    from audioclf.features import Normalize

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bank = FeatureBank.build(synthetic_clipset(n), SHORT, cache_dir=cache_dir, quiet=True)  # checks every shard
    if in_memory:
        bank.to_device("cpu", max_bytes=2**62)
    t1 = time.perf_counter()
    norm = Normalize(SHORT.n_mels).fit(bank.clip_frames(i) for i in range(len(bank)))
    t2 = time.perf_counter()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, N_CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    data_s = 0.0
    for _ in range(batches):
        t = time.perf_counter()
        x, y = bank.batch(torch.randint(len(bank), (16,), generator=gen), random_crop=True, generator=gen)
        data_s += time.perf_counter() - t
        torch.nn.functional.cross_entropy(model(norm(x).unsqueeze(1)), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"peak_rss_mb": vm_hwm_mb(), "open_s": t1 - t0, "fit_s": t2 - t1, "data_ms": 1000 * data_s / batches}


def run_child(*args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_rss(sizes: list[int], batches: int, tmp: Path) -> list[dict]:
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        folder = write_synthetic_store(n, SHORT, tmp / "rss")
        log.info("wrote a store of %d clips (%.0f MB) in %.1f s", n, du_mb(folder), time.perf_counter() - t0)
        row = {"clips": n, "store_mb": du_mb(folder)}
        for mode in ("store", "memory"):
            r = run_child("rss", n, tmp / "rss", int(mode == "memory"), batches)
            row.update({f"{k}_{mode}": v for k, v in r.items()})
            log.info("%d clips, %s: %s", n, mode, r)
        rows.append(row)
    return rows


def du_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


# ---------------------------------------------------------------------------------------------- share

def data_path_ms(bank: FeatureBank, min_s: float) -> tuple[float, float]:
    """Milliseconds per batch of 16: ``bank.batch`` (random crops) alone, and followed by SpecAugment and mixup
    as the trainer applies them (ResNet-18's recipe)."""
    import speed
    from audioclf.augment import SpecAugment, mixup

    augment = resolve(overrides={"model": {"backbone": "resnet18"}}).augment
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    specaug = SpecAugment(augment, gen).train()

    def batch():
        return bank.batch(torch.randint(len(bank), (16,), generator=gen), random_crop=True, generator=gen)

    def data_path():
        x, y = batch()
        mixup(specaug(x), y, N_CLASSES, augment.mixup_alpha, gen)

    return tuple(1000 * speed.timed(step, cpu, warmup=2, min_reps=20, min_s=min_s) for step in (batch, data_path))


def bench_share(n: int, min_s: float, tmp: Path) -> dict:
    """The data path against a ResNet-18 training step, per batch of 16 5-s clips: the store, then in RAM."""
    import speed

    features = FeatureConfig()
    write_synthetic_store(n, features, tmp / "share")
    bank = FeatureBank.build(synthetic_clipset(n), features, cache_dir=tmp / "share", quiet=True)
    r = {"share_clips": n, "share_store_mb": bank.nbytes / 1e6}
    r["batch_ms_store"], r["data_ms_store"] = data_path_ms(bank, min_s)
    bank.to_device("cpu")
    r["batch_ms_memory"], r["data_ms_memory"] = data_path_ms(bank, min_s)
    r["step_ms"] = 16e3 / speed.bench_model(torch.device("cpu"), N_CLASSES, min_reps=3, min_s=min_s)["clips_per_s"]
    for mode in ("store", "memory"):
        r[f"share_{mode}"] = r[f"data_ms_{mode}"] / (r[f"data_ms_{mode}"] + r["step_ms"])
    return r


# ---------------------------------------------------------------------------------------------- extract

def child_extract(cores: int, manifest: str, cache_dir: str) -> dict:
    """In a fresh process on ``cores`` cores: clips/s of a build with the default workers."""
    from audioclf.data import read_csv

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])  # inherited by the worker processes
    torch.set_num_threads(cores)
    clipset = read_csv(manifest)
    FeatureBank.build(ClipSet(clipset.clips[:4], clipset.classes), FeatureConfig(), cache_dir=Path(cache_dir) / "warmup",
                      quiet=True)
    t0 = time.perf_counter()
    FeatureBank.build(clipset, FeatureConfig(), cache_dir=cache_dir, quiet=True)
    return {"clips_per_s": len(clipset.clips) / (time.perf_counter() - t0), "cores": cpu_cores()}


def bench_extract(n: int, tmp: Path) -> dict:
    import speed

    rows = speed.generated_clips(n, tmp / "clips")
    for row in rows:  # every build then reads from the page cache
        Path(row["path"]).read_bytes()
    manifest = speed.write_manifest(rows, tmp / "clips.csv")
    total = cpu_cores()
    r = {"extract_clips": n, "cores": total}
    for cores in sorted({1, min(2, total), total}):
        r[f"extract_clips_per_s_{cores}"] = run_child("extract", cores, manifest, tmp / f"extract{cores}")["clips_per_s"]
        log.info("extraction on %d core(s): %.1f clips/s", cores, r[f"extract_clips_per_s_{cores}"])
    r["extract_scaling"] = r[f"extract_clips_per_s_{total}"] / (total * r["extract_clips_per_s_1"])
    return r


# ---------------------------------------------------------------------------------------------- report

def tables(r: dict) -> str:
    lines = ["| short clips | store (MB) | peak RSS, store (MB) | peak RSS, in RAM (MB) | open + check (s), store | "
             "`bank.batch` (ms), store | `bank.batch` (ms), in RAM |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['clips']:,} | {row['store_mb']:,.0f} | {row['peak_rss_mb_store']:,.0f} | "
              f"{row['peak_rss_mb_memory']:,.0f} | {row['open_s_store']:.1f} | {row['data_ms_store']:.2f} | "
              f"{row['data_ms_memory']:.2f} |" for row in r["rss"]]
    lines += ["", "| per batch of 16 5-s clips | `bank.batch` (ms) | data path (ms) | data path / (data path + step) |",
              "|---|---:|---:|---:|"]
    lines += [f"| {what} | {r[f'batch_ms_{mode}']:.2f} | {r[f'data_ms_{mode}']:.2f} | {100 * r[f'share_{mode}']:.2f} % |"
              for mode, what in (("store", f"store ({r['share_clips']:,} clips, {r['share_store_mb']:,.0f} MB, "
                                           f"memory-mapped)"), ("memory", "the same store, in RAM"))]
    lines += [f"| ResNet-18 training step (the trainer's settings) | — | — | {r['step_ms']:.0f} ms |",
              "", "| cores | extraction clips/s |", "|---:|---:|"]
    lines += [f"| {k.rsplit('_', 1)[1]} | {v:.1f} |" for k, v in r.items() if k.startswith("extract_clips_per_s_")]
    lines += ["", f"Extraction scaling on {r['cores']} cores: {r['extract_scaling']:.2f} x linear "
                  f"({r['extract_clips']} generated 5-s 44.1 kHz WAVs). Stores for the RSS part were written from "
                  f"random features; {r['batches']} batches per case; {torch.get_num_threads()} torch thread(s); torch "
                  f"{torch.__version__}; total "
                  f"{r['total_s'] / 60:.1f} min."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        r = child_rss(int(rest[0]), rest[1], bool(int(rest[2])), int(rest[3])) if kind == "rss" else \
            child_extract(int(rest[0]), rest[1], rest[2])
        print(json.dumps(r))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    sizes, batches = ([300], 3) if args.quick else ([2_000, 20_000, 100_000], 200)
    with tempfile.TemporaryDirectory(prefix="audioclf-scale-") as name:
        tmp = Path(name)
        r: dict = {"batches": batches, "rss": bench_rss(sizes, batches, tmp)}
        r.update(bench_share(32 if args.quick else 2_000, 0.01 if args.quick else 3.0, tmp))
        r.update(bench_extract(8 if args.quick else 1536, tmp))  # long enough that starting the workers is not the figure
    r["total_s"] = time.perf_counter() - t0
    print(json.dumps(r, indent=1) if args.json else tables(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
