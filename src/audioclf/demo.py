"""A built-in synthetic dataset, so the whole pipeline runs on a fresh machine; the demo fine-tunes the default
backbone on it (its weights are one 4 MB download), or offline trains ResNet-18 from scratch.

Each class is a distinct kind of sound (tone, noise band, chirp, clicks, warble) with random pitch,
level, timing and background noise per clip, written as WAV files in the ``folder`` layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soundfile as sf

from .backbones import DEFAULT_BACKBONE
from .errors import AudioclfError

SYNTH_CLASSES = ("tone", "noise", "chirp", "clicks", "warble")


def synth_clip(kind: str, rng: np.random.Generator, sample_rate: int = 16000, duration_s: float = 2.0) -> np.ndarray:
    """One mono float32 clip of ``kind`` (one of ``SYNTH_CLASSES``), peak below 1."""
    n = int(sample_rate * duration_s)
    t = np.arange(n) / sample_rate
    if kind == "tone":
        f0 = rng.uniform(300, 900)
        y = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3))
    elif kind == "noise":
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / sample_rate)
        lo = rng.uniform(1500, 3000)
        spec[(freqs < lo) | (freqs > lo * 1.6)] = 0
        y = np.fft.irfft(spec, n)
    elif kind == "chirp":
        f0, f1 = rng.uniform(200, 500), rng.uniform(2500, 5000)
        y = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * duration_s)))
    elif kind == "clicks":
        y = np.zeros(n)
        period = int(sample_rate / rng.uniform(6, 14))
        for start in range(int(rng.integers(0, period)), n, period):
            burst = rng.standard_normal(min(64, n - start)) * np.exp(-np.arange(min(64, n - start)) / 8)
            y[start:start + burst.size] += burst
    elif kind == "warble":
        f0, rate = rng.uniform(600, 1200), rng.uniform(4, 9)
        y = np.sin(2 * np.pi * f0 * t + (f0 * 0.15 / rate) * np.sin(2 * np.pi * rate * t))
    else:
        raise ValueError(f"Unsupported kind={kind!r}; choose one of {', '.join(SYNTH_CLASSES)}")
    y = y / (np.abs(y).max() + 1e-9) * rng.uniform(0.3, 0.9)
    y = y + rng.standard_normal(n) * rng.uniform(0.003, 0.03)
    return (y / max(1.0, np.abs(y).max() * 1.01)).astype(np.float32)


def make_synthetic_dataset(root, n_per_class: int = 24, classes: Sequence[str] = SYNTH_CLASSES,
                           sample_rate: int = 16000, duration_s: float = 2.0, seed: int = 0) -> Path:
    """Write ``root/<class>/<class>_NNN.wav`` clips and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            sf.write(root / kind / f"{kind}_{i:03d}.wav", synth_clip(kind, rng, sample_rate, duration_s), sample_rate)
    return root


def demo_config(data_dir, quiet: bool = False, weights_path: Optional[str] = None):
    """The demo's recipe: the default path (``mn04_as`` fine-tuned from its AudioSet weights at
    ``weights_path``, with its own recipe, as ``audioclf train`` does), or without the weights a small
    ResNet-18 recipe from scratch. Either trains on a 2-core CPU in about a minute."""
    from .config import resolve

    data = {"root": str(data_dir), "format": "folder", "val_split": 0.25}
    if weights_path:
        return resolve(overrides={
            "data": data, "features": {"duration_s": 2.0},
            "model": {"backbone": DEFAULT_BACKBONE, "weights_path": str(weights_path)},
            "train": {"quiet": quiet},
        })
    return resolve(overrides={
        "data": data,
        "features": {"sample_rate": 16000, "duration_s": 2.0},
        "model": {"backbone": "resnet18", "pretrained": "none"},
        "train": {"epochs": 8, "batch_size": 16, "lr": 1e-3, "scheduler": "cosine", "warmup_epochs": 1,
                  "patience": 4, "quiet": quiet},
    })


def default_weights() -> tuple[Optional[Path], Optional[str]]:
    """(the checked file of the default backbone's pretrained weights, None), from the torch hub cache or a
    download; or (None, why they cannot be had: the file name, its URL and where to put it)."""
    from .weights import weights_file

    try:
        return weights_file(DEFAULT_BACKBONE), None
    except AudioclfError as e:
        return None, str(e)


def run_demo(out="runs/demo", quiet: bool = False) -> dict:
    """Make the synthetic dataset, train on it, and evaluate the best model on fresh clips it never saw.

    Trains the default backbone from its pretrained weights when they can be had; otherwise ResNet-18 from
    scratch, with a warning that says why.

    Returns:
        dict: ``train`` (``fit``'s summary), ``eval`` (``evaluate``'s metrics, with the text ``report``),
        ``run_dir`` and ``eval_dir`` (where they were written) and ``test_dir`` (the unseen clips), as Paths;
        ``model`` (what was trained, in words) and ``fallback`` (why not the default backbone, or None).
    """
    import logging
    from dataclasses import replace

    from .evaluate import evaluate
    from .train import fit

    log = logging.getLogger(__name__)
    out = Path(out)
    weights, why_not = default_weights()
    if why_not:
        log.warning("%s. The demo trains ResNet-18 from scratch instead; with that file in place, "
                    "`audioclf demo` fine-tunes %s, the default backbone", why_not, DEFAULT_BACKBONE)
    data_dir = make_synthetic_dataset(out / "data")
    test_dir = make_synthetic_dataset(out / "test", n_per_class=10, seed=1)  # other random draws: unseen clips
    log.info("synthetic dataset: %s (%d classes), held-out test clips: %s", data_dir, len(SYNTH_CLASSES), test_dir)
    config = demo_config(data_dir, quiet, weights)
    run_dir, eval_dir = out / "run", out / "run" / "eval"
    summary = fit(config, run_dir, overwrite=True)  # a rerun of the demo replaces its earlier run
    metrics = evaluate(run_dir, replace(config.data, root=str(test_dir)), out_dir=eval_dir, quiet=quiet)
    model = (f"{DEFAULT_BACKBONE}, fine-tuned from its AudioSet weights" if weights else
             "resnet18, from scratch")
    return {"train": summary, "eval": metrics, "run_dir": run_dir, "eval_dir": eval_dir, "test_dir": test_dir,
            "model": model, "fallback": why_not}
