"""Speed: audioclf's data path, training and inference, side by side with the original tutorial's pipeline and the machine's limit.

    python benchmarks/speed.py                  # everything below (8-20 min on 2 CPU cores, with the load)
    python benchmarks/speed.py --quick          # 64 clips, a 10-min long file, 32 predict files: about 5 min
    python benchmarks/speed.py --json           # one JSON object instead of the table
    python benchmarks/speed.py --model RUN_DIR  # time inference with this model instead of the benchmark's own run
    python benchmarks/speed.py --device cuda    # GPU LogMel, AMP and channels_last, as the trainer uses them
    python benchmarks/speed.py --backbones      # only: each backbone's training step and inference latency (2 min)
    python benchmarks/speed.py --distributed-predict  # only: torchrun predict --out DIR, 1 and 2 processes (1 min)

All figures come from one run on the same clips: ESC-50's clips (--esc50 DIR, 5-s, 44.1 kHz; by default
../shared/data/esc50 beside the clone), or generated 5-s 44.1 kHz clips when there are none (or with --synthetic).

tutorial_clips_per_s        the original tutorial's per-item path: librosa.load(sr=22050) + melspectrogram + log1p, one clip at a time
extract_clips_per_s         audioclf's first pass: FeatureBank.build (decode, resample, batched LogMel) into a fresh cache
cached_clips_per_s          audioclf's per-epoch data path: FeatureBank.batch (random crop) + SpecAugment + mixup, batch 16
model_train_clips_per_s     bare ResNet-18 forward + backward + AdamW step on random (16, 80, 431) input, timed just
                            before and just after the pipeline run (the mean step time of the two); as the trainer
                            runs it (channels-last, bf16 autocast where native); ``*_fp32_nchw``: in fp32, NCHW
pipeline_train_clips_per_s  a real epoch of ``python -m audioclf train`` (its metrics.csv), fresh cache, from scratch
pipeline_efficiency         pipeline / model: 1.0 means the data path costs the trainer nothing
gemm_gflops                 a 2048 x 2048 fp32 matmul; model_gflops = the model's counted FLOPs / step time
predict_cold_s              wall time of ``python -m audioclf predict MODEL one.flac`` (median of new processes)
predict_clips_per_s         Classifier.classify_files over 200 clips (32 with --quick), model already loaded
long_audio_rtf              Classifier.classify(timeline=True) of a generated long 44.1 kHz WAV, seconds / audio seconds
long_audio_peak_mb          peak RSS of that process (MB = 10**6 bytes), model and torch included
train_peak_rss_mb           peak RSS of the ``audioclf train`` process above (cache build included)

Extra keys explain the misses: ``*_1thread`` (the same data path with one torch thread), ``data_path_share``
(cached data-path time per clip / pipeline time per clip), ``model_window_gflop`` and ``long_audio_rtf_floor``
(the long file's windows at ``gemm_gflops``: no model of this size can beat it on this machine),
``predict_cold_cpu_s`` and ``predict_cold_peak_mb``.

``--distributed-predict`` times ``torchrun --nproc_per_node=N -m audioclf predict MODEL FOLDER --out DIR`` over
200 generated 1-s 16 kHz clips with an untrained ResNet-18 (64 mels), a fresh DIR for each N: files/s as the
command's summary line counts them (the process group, model load, classification and merge, not the start of
the processes), and over the command's whole wall time.

Peak memory is ``ru_maxrss`` from ``os.wait4``: the largest single process of the command's tree (a DataLoader
worker counts on its own, not added to its parent). Absolute numbers depend on what else runs on the machine;
the ratios, measured within one run, are what the targets are about. With --quick the training epoch is
three or four batches, one of them partial, so pipeline_efficiency there is a smoke check, not a figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from audioclf.augment import SpecAugment, mixup
from audioclf.checkpoint import inference_state, save_checkpoint
from audioclf.config import FeatureConfig, resolve
from audioclf.data import Clip, ClipSet
from audioclf.features import LogMel
from audioclf.model import AudioResNet
from audioclf.optim import make_optimizer
from audioclf.runtime import amp_dtype, resolve_device
from audioclf.store import FeatureBank

ESC50 = Path(__file__).resolve().parents[2] / "shared" / "data" / "esc50"  # --esc50's default
CLIP_SR = 44100  # Hz, the ESC-50 rate, also used for the generated clips and the long file
log = logging.getLogger("speed")

# metric -> (target text, test of the result dict); metrics without a target show a dash
TARGETS = {
    "extract_clips_per_s": ("≥ 5 × tutorial", lambda r: r["extract_clips_per_s"] >= 5 * r["tutorial_clips_per_s"]),
    "cached_clips_per_s": ("≥ 20 × tutorial and ≥ 5000",
                           lambda r: r["cached_clips_per_s"] >= max(20 * r["tutorial_clips_per_s"], 5000)),
    "pipeline_efficiency": ("≥ 0.95", lambda r: r["pipeline_efficiency"] >= 0.95),
    "predict_cold_s": ("≤ 3", lambda r: r["predict_cold_s"] <= 3),
    "long_audio_rtf": ("≤ 0.01", lambda r: r["long_audio_rtf"] <= 0.01),
    "long_audio_peak_mb": ("< 1500", lambda r: r["long_audio_peak_mb"] < 1500),
}
METRICS = ["tutorial_clips_per_s", "extract_clips_per_s", "cached_clips_per_s", "model_train_clips_per_s",
           "pipeline_train_clips_per_s", "pipeline_efficiency", "gemm_gflops", "model_gflops", "model_utilisation",
           "predict_cold_s", "predict_clips_per_s", "long_audio_rtf", "long_audio_peak_mb", "train_peak_rss_mb"]

# A small process that runs a command and writes its wall time, CPU time and peak RSS to argv[1] as JSON. The
# benchmark cannot measure the command as its own child: a child's high-water mark starts at its parent's (fork,
# then exec records the old one), so every peak would read as at least the benchmark's own.
MEASURE = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, u = os.wait4(p.pid, 0)
json.dump({"wall_s": time.perf_counter() - t0, "cpu_s": u.ru_utime + u.ru_stime, "peak_mb": u.ru_maxrss * 1024 / 1e6},
          open(sys.argv[1], "w"))
sys.exit(os.waitstatus_to_exitcode(status))
"""

# Run in a new process so its peak memory is its own: load the model, classify one long file with a timeline.
LONG_AUDIO = """
import json, sys, time
import audioclf
clf = audioclf.load(sys.argv[1], sys.argv[3])
t0 = time.perf_counter()
r = clf.classify(sys.argv[2], timeline=True)
print(json.dumps({"classify_s": time.perf_counter() - t0, "windows": len(r["windows"]), "duration_s": r["duration_s"]}))
"""


# ---------------------------------------------------------------------------------------------- helpers

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def timed(step, device: torch.device, *, warmup: int, min_reps: int, min_s: float) -> float:
    """Seconds per call of ``step()``: ``warmup`` untimed calls, then at least ``min_reps`` calls and ``min_s`` seconds."""
    for _ in range(warmup):
        step()
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_s:
        step()
        reps += 1
        sync(device)
    return (time.perf_counter() - t0) / reps


def run_measured(cmd: list, log_path: Path) -> dict:
    """Run ``cmd`` (stderr to ``log_path``): its ``wall_s``, ``cpu_s``, ``peak_mb`` (its largest process) and ``stdout``."""
    report = log_path.with_suffix(".json")
    with open(log_path, "w") as err:
        done = subprocess.run([sys.executable, "-c", MEASURE, str(report), *map(str, cmd)], stdout=subprocess.PIPE,
                              stderr=err, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with exit code {done.returncode}; {log_path} ends:\n"
                           f"{log_path.read_text()[-3000:]}")
    return {**json.loads(report.read_text()), "stdout": done.stdout}


def audioclf_cmd(*args) -> list:
    return [sys.executable, "-m", "audioclf", *args]


# ---------------------------------------------------------------------------------------------- clips

def esc50_clips(root: Path, n: int) -> list[dict]:
    """Up to ``n`` clips of the ESC-50 copy at ``root`` as manifest rows, every class represented (round-robin over classes)."""
    with open(root / "meta" / "esc50.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (root / "audio" / r["filename"]).is_file()]
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["category"], []).append(r)
    picked = []
    while len(picked) < min(n, len(rows)):
        for members in by_class.values():
            if members and len(picked) < n:
                picked.append(members.pop(0))
    return [{"path": str(root / "audio" / r["filename"]), "label": r["category"], "fold": int(r["fold"]),
             "group": r["src_file"]} for r in picked]


def generated_clips(n: int, folder: Path, n_classes: int = 4) -> list[dict]:
    """``n`` 5-s 44.1 kHz 16-bit WAVs: each class a tone at its own pitch in noise, so a model can tell them apart."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(5 * CLIP_SR) / CLIP_SR
    rows = []
    for i in range(n):
        k = i % n_classes
        f0 = 220.0 * 2 ** k * rng.uniform(0.95, 1.05)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))
        wave += 0.05 * rng.standard_normal(t.size)
        path = folder / f"clip{i:04d}-class{k}.wav"
        sf.write(path, wave.astype(np.float32), CLIP_SR, subtype="PCM_16")
        rows.append({"path": str(path), "label": f"class{k}", "fold": i // n_classes % 4 + 1, "group": str(i)})
    return rows


def write_manifest(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "fold", "group"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_long_wav(path: Path, seconds: float, block_s: float = 60.0) -> None:
    """A mono 16-bit WAV at 44.1 kHz written block by block, so the generator holds one block, never the file."""
    rng = np.random.default_rng(1)
    n_total, block = int(seconds * CLIP_SR), int(block_s * CLIP_SR)
    t = np.arange(block) / CLIP_SR
    with sf.SoundFile(path, "w", CLIP_SR, 1, subtype="PCM_16") as f:
        for start in range(0, n_total, block):
            n = min(block, n_total - start)
            tone = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t[:n])  # a new sound every block
            f.write((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))


# ---------------------------------------------------------------------------------------------- data path

def bench_tutorial(paths: list[str]) -> float:
    """The original tutorial's Dataset.__getitem__, one clip at a time: clips per second."""
    import librosa

    def item(path):
        y, sr = librosa.load(path, sr=22050)
        return np.log1p(librosa.feature.melspectrogram(y=y, sr=sr, n_fft=1024, hop_length=256, win_length=1024,
                                                       n_mels=80))

    for p in paths[:2]:  # warm-up: resampler and filterbank set-up
        item(p)
    t0 = time.perf_counter()
    for p in paths:
        item(p)
    return len(paths) / (time.perf_counter() - t0)


def bench_extract(clipset: ClipSet, device: torch.device, cache_dir: Path) -> tuple[float, FeatureBank]:
    """``FeatureBank.build`` into a fresh cache with the default workers, as ``audioclf train``'s first pass."""
    warm = ClipSet(clipset.clips[:4], clipset.classes)  # warm-up: STFT kernels, worker start-up code paths
    FeatureBank.build(warm, FeatureConfig(), cache_dir=cache_dir / "warmup", device=device, quiet=True)
    sync(device)
    t0 = time.perf_counter()
    bank = FeatureBank.build(clipset, FeatureConfig(), cache_dir=cache_dir, device=device, quiet=True)
    sync(device)
    return len(clipset.clips) / (time.perf_counter() - t0), bank


def bench_cached(bank: FeatureBank, device: torch.device, n_classes: int, min_s: float) -> float:
    """One epoch of the trainer's data path per call, batch 16: crop, SpecAugment, mixup, on ``device``."""
    augment = resolve("default").augment
    gen = torch.Generator().manual_seed(0)
    specaug = SpecAugment(augment, gen).train()
    if device.type == "cuda":
        bank.to_device(device)  # the trainer keeps a store that fits whole on the GPU

    def epoch():
        # indices stay on the CPU, where bank.lengths is
        order = torch.randperm(len(bank), generator=gen)
        for i in range(0, len(order), 16):
            x, y = bank.batch(order[i:i + 16], random_crop=True, generator=gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            mixup(specaug(x), y, n_classes, augment.mixup_alpha, gen)

    return len(bank) / timed(epoch, device, warmup=1, min_reps=3, min_s=min_s)


# ---------------------------------------------------------------------------------------------- compute

def bench_gemm(device: torch.device, dtype=torch.float32, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, warmup=2, min_reps=5, min_s=1.0 if device.type == "cpu" else 0.5)
    return 2 * n ** 3 / s / 1e9


def bench_model(device: torch.device, n_classes: int, *, min_reps: int, min_s: float, fast: bool = True) -> dict:
    """ResNet-18 training steps on random (16, n_mels, n_frames) input, set up as ``train.fit`` sets it up (AdamW,
    label smoothing, dropout; channels_last, and AMP where it pays: CUDA, or a CPU with native bf16): clips per
    second, counted FLOPs of one step and of one inference window, and ``step`` to time it again.
    ``fast=False``: the same in fp32 with the default memory layout, what the trainer did before both."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, c = 16, FeatureConfig()
    t = resolve("default").train
    model = AudioResNet.from_config(resolve("default").model, n_classes, c.n_mels).to(device)
    amp = amp_dtype(device) if t.amp and fast else None
    if fast:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, replace(t, lr=1e-3), device)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    x = torch.randn(batch, c.n_mels, c.n_frames, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)

    def forward_backward():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=t.label_smoothing)
        scaler.scale(loss).backward()

    def step():
        forward_backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as window, torch.no_grad():
        model.eval()(x[:1])
    model.train()
    with FlopCounterMode(display=False) as train_step:
        forward_backward()
    opt.zero_grad(set_to_none=True)
    s = timed(step, device, warmup=2 if device.type == "cpu" else 10, min_reps=min_reps, min_s=min_s)
    return {"clips_per_s": batch / s, "step": step, "step_flops": float(train_step.get_total_flops()),
            "window_flops": float(window.get_total_flops()),
            "amp_dtype": str(amp).removeprefix("torch.") if amp else None}


def bench_backbones(device: torch.device, min_s: float) -> list[dict]:
    """Each backbone set up as its recipe says (front end, batch size, AMP or not, channels_last): training
    clips/s of forward + backward + AdamW on random features, the same in the other precision, and the
    latency of one 5-s clip through the whole inference graph (waveform -> probabilities, batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    from audioclf.backbones import BACKBONES
    from audioclf.model import WaveformClassifier, build_network

    rows = []
    for name in ("resnet18", "mn04_as"):
        cfg = resolve(overrides={"model": {"backbone": name, "pretrained": "none"}})
        c, t, n_classes = cfg.features, cfg.train, 50
        row = {"backbone": name, "params": 0, "batch": t.batch_size, "input": f"{c.n_mels} x {c.n_frames}"}
        for amp_on in (t.amp, not t.amp):
            model = build_network(cfg.model, n_classes, c.n_mels).to(device, memory_format=torch.channels_last).train()
            row["params"] = sum(p.numel() for p in model.parameters())
            amp = amp_dtype(device) if amp_on else None
            opt = make_optimizer(model, replace(t, lr=1e-3), device)
            x = torch.randn(t.batch_size, c.n_mels, c.n_frames, device=device)
            y = torch.randint(0, n_classes, (t.batch_size,), device=device)

            def step():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = F.cross_entropy(model(x).float(), y, label_smoothing=t.label_smoothing)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            key = "train_clips_per_s" if amp_on == t.amp else "train_clips_per_s_other"
            row[key] = t.batch_size / timed(step, device, warmup=2, min_reps=3, min_s=min_s)
            row[key.replace("clips_per_s", "dtype")] = str(amp).removeprefix("torch.") if amp else "float32"
        net = WaveformClassifier(c, build_network(cfg.model, n_classes, c.n_mels)).to(device, memory_format=torch.channels_last).eval()
        wave = 0.1 * torch.randn(1, c.n_samples, device=device)
        with torch.inference_mode():
            row["latency_ms"] = 1000 * timed(lambda: net(wave), device, warmup=3, min_reps=10, min_s=min_s)
            with FlopCounterMode(display=False) as flops:
                net.model(net.logmel(wave))
        row["window_gflop"] = flops.get_total_flops() / 1e9
        row["weights"] = BACKBONES[name].weights_file
        rows.append(row)
        log.info("%s: %s", name, row)
    return rows


def backbone_table(rows: list[dict]) -> str:
    lines = ["| backbone | parameters | input (mels x frames) | batch | training clips/s | in the other precision | "
             "inference ms per 5-s clip | GFLOP per clip |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['backbone']} | {r['params']:,} | {r['input']} | {r['batch']} | {r['train_clips_per_s']:.1f} "
              f"({r['train_dtype']}) | {r['train_clips_per_s_other']:.1f} ({r['train_dtype_other']}) | "
              f"{r['latency_ms']:.1f} | {r['window_gflop']:.2f} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- whole runs

def bench_pipeline(manifest: Path, device: torch.device, tmp: Path) -> tuple[float, float, Path]:
    """``audioclf train`` from scratch with a fresh cache: (clips/s of its last epoch, peak RSS MB, run dir).

    On CPU one epoch is enough (the first step costs what the others do); on CUDA the first epoch pays for
    kernel selection, so two run and the second counts.
    """
    run = tmp / "run"
    epochs = 2 if device.type == "cuda" else 1
    m = run_measured(audioclf_cmd("train", manifest, "--format", "csv", "--epochs", epochs, "--patience", 0,
                                  "--no-pretrained", "--quiet", "--device", device, "--cache-dir", tmp / "cache-train",
                                  "--out", run), tmp / "train.log")
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["clips_per_s"]), m["peak_mb"], run


def bench_predict_cold(model: Path, clip: str, device: torch.device, tmp: Path, reps: int) -> dict:
    """``audioclf predict MODEL CLIP``, a new process each time: median wall and CPU seconds, largest peak RSS."""
    runs = [run_measured(audioclf_cmd("predict", model, clip, "--quiet", "--device", device), tmp / "predict-cold.log")
            for _ in range(reps)]
    return {"predict_cold_s": statistics.median(m["wall_s"] for m in runs),
            "predict_cold_cpu_s": statistics.median(m["cpu_s"] for m in runs),
            "predict_cold_peak_mb": max(m["peak_mb"] for m in runs)}


def bench_predict_files(model: Path, paths: list[str], device: torch.device) -> float:
    """Clips per second of ``Classifier.classify_files`` (background decoding, shared batches), model loaded."""
    import audioclf

    clf = audioclf.load(model, str(device))
    list(clf.classify_files(paths[:2], quiet=True))  # warm-up: kernels, worker start-up code paths
    sync(device)
    t0 = time.perf_counter()
    results = list(clf.classify_files(paths, quiet=True))
    sync(device)
    failed = [r["error"] for r in results if r["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(paths)} files failed, e.g. {failed[0]}")
    return len(paths) / (time.perf_counter() - t0)


def bench_long_audio(model: Path, seconds: float, device: torch.device, tmp: Path) -> dict:
    """Real-time factor and peak memory of classifying a generated ``seconds``-long file with a timeline."""
    path = tmp / "long.wav"
    t0 = time.perf_counter()
    write_long_wav(path, seconds)
    log.info("wrote %s (%.0f s of audio, %.0f MB) in %.0f s", path, seconds, path.stat().st_size / 1e6,
             time.perf_counter() - t0)
    m = run_measured([sys.executable, "-c", LONG_AUDIO, model, path, device], tmp / "long.log")
    r = json.loads(m["stdout"].strip().splitlines()[-1])
    path.unlink()
    return {"long_audio_rtf": r["classify_s"] / r["duration_s"], "long_audio_peak_mb": m["peak_mb"],
            "long_audio_s": r["duration_s"], "long_audio_windows": r["windows"]}


def small_model(path: Path, n_classes: int = 4) -> Path:
    """An untrained ResNet-18 over 1-s 16 kHz clips (64 mels), saved for inference: the timing is of the work per
    file, whatever the model has learnt."""
    cfg = resolve(overrides={"features": {"sample_rate": 16000, "duration_s": 1.0, "n_mels": 64},
                             "model": {"backbone": "resnet18", "pretrained": "none"}})
    torch.manual_seed(0)
    model = AudioResNet.from_config(cfg.model, n_classes, cfg.features.n_mels)
    with torch.no_grad():
        model.norm.fit(LogMel(cfg.features)(0.1 * torch.randn(8, cfg.features.n_samples)))
    save_checkpoint(inference_state(model.eval(), cfg, [f"class{k}" for k in range(n_classes)]), path)
    return path


def short_clips(n: int, folder: Path, sample_rate: int = 16000) -> Path:
    """``n`` 1-s 16-bit WAVs in ``folder``: a tone in noise, each at its own pitch."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(sample_rate) / sample_rate
    for i in range(n):
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"short{i:05d}.wav", wave.astype(np.float32), sample_rate, subtype="PCM_16")
    return folder


def bench_distributed_predict(device: torch.device, tmp: Path, n_files: int = 200,
                              processes: tuple = (1, 2)) -> list[dict]:
    """Files/s of ``torchrun --nproc_per_node=N -m audioclf predict ... --out DIR`` for each N: from the command's
    summary line (group, model, classification, merge) and from its wall time (process start-up included)."""
    model, folder = small_model(tmp / "small.pt"), short_clips(n_files, tmp / "short")
    rows = []
    for n in processes:
        if device.type == "cuda" and n > torch.cuda.device_count():
            log.info("distributed predict: %d processes need %d GPUs; skipped", n, n)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "audioclf",
               "predict", model, folder, "--out", tmp / f"predict-{n}", "--quiet", "--device", device]
        t0 = time.perf_counter()
        done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        wall_s = time.perf_counter() - t0
        summary = re.search(r"(\d+) classified now.*\(([\d.]+) s, ([\d.]+) files/s\)", done.stderr)
        if done.returncode != 0 or summary is None:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
        rows.append({"processes": n, "files": int(summary[1]), "run_s": float(summary[2]),
                     "files_per_s": float(summary[3]), "wall_s": wall_s, "wall_files_per_s": n_files / wall_s})
        log.info("distributed predict: %s", rows[-1])
    return rows


def distributed_table(rows: list[dict], device: torch.device) -> str:
    lines = ["| processes | files | files/s (group, model, classify, merge) | files/s (whole command) |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['files']} | {r['files_per_s']:.1f} ({r['run_s']:.1f} s) | "
              f"{r['wall_files_per_s']:.1f} ({r['wall_s']:.1f} s) |" for r in rows]
    lines.append(f"\ndevice {device} ({device_name(device)}), {os.cpu_count()} CPUs, torch {torch.__version__}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report

def fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def table(r: dict) -> str:
    lines = ["| metric | value | target | met? |", "|---|---:|---|:---:|"]
    for k in METRICS:
        target, test = TARGETS.get(k, ("—", None))
        lines.append(f"| {k} | {fmt(r[k])} | {target} | {'—' if test is None else ('yes' if test(r) else '**no**')} |")
    lines += ["", f"{r['n_clips']} {r['clip_source']} clips, device {r['device']} ({r['device_name']}), "
                  f"{r['torch_threads']} torch threads, {r['cpu_count']} CPUs, torch {r['torch']}; total "
                  f"{r['total_s'] / 60:.1f} min.",
              f"- with 1 torch thread in the main process: extract {fmt(r['extract_clips_per_s_1thread'])} clips/s, "
              f"cached {fmt(r['cached_clips_per_s_1thread'])} clips/s",
              f"- the cached data path is {100 * r['data_path_share']:.2f} % of the pipeline's time per clip; "
              f"one training step is {r['model_step_gflop']:.0f} GFLOP",
              f"- predict, new process: {r['predict_cold_cpu_s']:.1f} CPU s, peak {fmt(r['predict_cold_peak_mb'])} MB; "
              f"{r['predict_files']} files for predict_clips_per_s",
              f"- long file: {r['long_audio_s'] / 60:.0f} min, {r['long_audio_windows']} windows of "
              f"{r['model_window_gflop']:.1f} GFLOP; at gemm_gflops the model alone would take RTF "
              f"{r['long_audio_rtf_floor']:.4f}"]
    lines.append(f"- the same training step in fp32 with the default (NCHW) layout: {fmt(r['model_train_clips_per_s_fp32_nchw'])} "
                 f"clips/s ({r['model_train_clips_per_s'] / r['model_train_clips_per_s_fp32_nchw']:.2f}x slower than the trainer's)")
    if r.get("amp_dtype"):
        lines.append(f"- training steps run under {r['amp_dtype']} autocast: a {r['amp_dtype']} gemm reaches "
                     f"{fmt(r['gemm_amp_gflops'])} GFLOP/s, model_utilisation against it {r['model_utilisation_amp']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 clips, 10-min long file, 32 predict files: a few minutes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--model", help="run directory to time inference with (default: the benchmark's own training run)")
    p.add_argument("--clips", type=int, help="clips for the data-path and training figures (default 320, 64 with --quick)")
    p.add_argument("--esc50", type=Path, default=ESC50, help="ESC-50 folder (audio/, meta/esc50.csv) to time on "
                   "(default: ../shared/data/esc50 beside the clone; generated clips when it is absent)")
    p.add_argument("--synthetic", action="store_true", help="generated clips even when ESC-50 is present")
    p.add_argument("--backbones", action="store_true", help="only the backbone comparison (training step, latency)")
    p.add_argument("--distributed-predict", action="store_true",
                   help="only torchrun predict --out DIR with 1 and 2 processes, 200 short files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = resolve_device(args.device)
    if args.backbones:
        rows = bench_backbones(device, min_s=3.0)
        print(json.dumps(rows, indent=1) if args.json else backbone_table(rows))
        return 0
    if args.distributed_predict:
        with tempfile.TemporaryDirectory(prefix="audioclf-speed-") as tmp_name:
            rows = bench_distributed_predict(device, Path(tmp_name))
        print(json.dumps(rows, indent=1) if args.json else distributed_table(rows, device))
        return 0
    n_clips = args.clips or (64 if args.quick else 320)
    n_predict = 32 if args.quick else 200
    long_s = 600.0 if args.quick else 3600.0
    min_s = 1.0 if args.quick else 3.0  # timed seconds per cheap measurement; the model gets ten times that
    t_start = time.perf_counter()
    r: dict = {"device": str(device), "device_name": device_name(device), "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "quick": args.quick}

    with tempfile.TemporaryDirectory(prefix="audioclf-speed-") as tmp_name:
        tmp = Path(tmp_name)
        use_esc = args.esc50.is_dir() and not args.synthetic
        rows = esc50_clips(args.esc50, n_clips) if use_esc else generated_clips(n_clips, tmp / "clips")
        classes = sorted({row["label"] for row in rows})
        clipset = ClipSet([Clip(row["path"], classes.index(row["label"]), row["fold"], row["group"]) for row in rows],
                          classes)
        paths = [c.path for c in clipset.clips]
        for path in paths:  # every stage then reads from the page cache, the first one included
            Path(path).read_bytes()
        r.update(clip_source="ESC-50" if use_esc else "generated", n_clips=len(paths))
        log.info("%d %s clips, %d classes, device %s, %d torch threads", len(paths), r["clip_source"], len(classes),
                 device, r["torch_threads"])

        r["tutorial_clips_per_s"] = bench_tutorial(paths)
        log.info("tutorial path: %.1f clips/s", r["tutorial_clips_per_s"])
        r["extract_clips_per_s"], bank = bench_extract(clipset, device, tmp / "cache-extract")
        r["cached_clips_per_s"] = bench_cached(bank, device, len(classes), min_s)
        # The same two with one torch thread: small copies split over threads that compete with the decoding
        # worker (or other jobs) for the cores can cost more than the work itself.
        with torch_threads(1):
            r["extract_clips_per_s_1thread"], _ = bench_extract(clipset, device, tmp / "cache-extract-1thread")
            r["cached_clips_per_s_1thread"] = bench_cached(bank, device, len(classes), min_s)
        log.info("feature extraction: %.1f clips/s (1 thread: %.1f); cached data path: %.0f clips/s (1 thread: %.0f)",
                 r["extract_clips_per_s"], r["extract_clips_per_s_1thread"], r["cached_clips_per_s"],
                 r["cached_clips_per_s_1thread"])
        del bank

        r["gemm_gflops"] = bench_gemm(device)
        log.info("gemm: %.1f GFLOP/s", r["gemm_gflops"])
        # The model just before and just after the pipeline, so that the ratio compares like with like even
        # when the machine's load changes.
        m = bench_model(device, len(classes), min_reps=3 if args.quick else 5, min_s=10 * min_s)
        log.info("model: %.2f clips/s", m["clips_per_s"])
        r["pipeline_train_clips_per_s"], r["train_peak_rss_mb"], run = bench_pipeline(
            write_manifest(rows, tmp / "clips.csv"), device, tmp)
        log.info("pipeline: %.2f clips/s, peak %.0f MB", r["pipeline_train_clips_per_s"], r["train_peak_rss_mb"])
        after = 16 / timed(m.pop("step"), device, warmup=1, min_reps=2 if args.quick else 4, min_s=5 * min_s)
        log.info("model again: %.2f clips/s", after)
        plain = bench_model(device, len(classes), min_reps=2 if args.quick else 4, min_s=5 * min_s, fast=False)
        r["model_train_clips_per_s_fp32_nchw"] = plain["clips_per_s"]
        log.info("model in fp32, default layout: %.2f clips/s", plain["clips_per_s"])
        r["model_train_clips_per_s_runs"] = [round(m["clips_per_s"], 4), round(after, 4)]
        r["model_train_clips_per_s"] = 2 / (1 / m["clips_per_s"] + 1 / after)  # from the mean step time
        r["pipeline_efficiency"] = r["pipeline_train_clips_per_s"] / r["model_train_clips_per_s"]
        r["data_path_share"] = r["pipeline_train_clips_per_s"] / r["cached_clips_per_s"]
        r["model_step_gflop"], r["model_window_gflop"] = m["step_flops"] / 1e9, m["window_flops"] / 1e9
        r["model_gflops"] = m["step_flops"] / 16 * r["model_train_clips_per_s"] / 1e9
        r["model_utilisation"] = r["model_gflops"] / r["gemm_gflops"]
        if m["amp_dtype"]:  # under AMP the model's matmuls run in 16 bits: compare with a 16-bit gemm too
            r["amp_dtype"] = m["amp_dtype"]
            r["gemm_amp_gflops"] = bench_gemm(device, getattr(torch, m["amp_dtype"]))
            r["model_utilisation_amp"] = r["model_gflops"] / r["gemm_amp_gflops"]

        model = Path(args.model) if args.model else run
        r.update(bench_predict_cold(model, paths[0], device, tmp, reps=2 if args.quick else 3))
        log.info("predict, new process: %.1f s", r["predict_cold_s"])
        predict_paths = [paths[i % len(paths)] for i in range(n_predict)]
        r["predict_clips_per_s"], r["predict_files"] = bench_predict_files(model, predict_paths, device), n_predict
        log.info("predict: %.1f clips/s", r["predict_clips_per_s"])
        r.update(bench_long_audio(model, long_s, device, tmp))
        r["long_audio_rtf_floor"] = r["long_audio_windows"] * m["window_flops"] / (r["gemm_gflops"] * 1e9) / r["long_audio_s"]
        log.info("long audio: RTF %.4f (floor %.4f), peak %.0f MB", r["long_audio_rtf"], r["long_audio_rtf_floor"],
                 r["long_audio_peak_mb"])
    r["total_s"] = time.perf_counter() - t_start

    if args.json:
        print(json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in r.items()}, indent=1))
    else:
        print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
