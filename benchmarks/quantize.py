"""int8 against fp32: the accuracy and CPU latency of ``audioclf export --format onnx --quantize int8`` beside
the fp32 ONNX export and PyTorch, each run evaluated on its own held-out test fold.

    python benchmarks/quantize.py RUN_DIR [RUN_DIR ...] --data ESC-50/ [--fold N] [--repeats 30] [--json]

Each RUN_DIR is a training run (``best.pt`` and ``config.yaml``) with a test fold (its ``data.test_fold``,
or ``--fold``); several, e.g. the fold runs of ``audioclf cv``, give one row each and their mean. The
test clips are read from ``--data`` in the run's dataset format and cut into the model's windows as
``audioclf predict`` cuts them; a clip's probabilities are the mean over its windows. Latency: one window
(batch 1) and a batch of 32 windows, median of ``--repeats`` runs after a warm-up, with onnxruntime's
intra-op threads set to torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import audioclf
from audioclf.audio import default_hop
from audioclf.checkpoint import load_model
from audioclf.data import load_clips
from audioclf.export import export
from audioclf.model import WaveformClassifier
from audioclf.predict import prepare

ENGINES = ("pytorch fp32", "onnx fp32", "onnx int8")
BATCH = 32  # windows per batch in the throughput measurement


def test_windows(run: Path, data: str, fold: int | None) -> tuple[list[np.ndarray], np.ndarray, int]:
    """The run's test clips from ``data``: each clip's windows ``(n_windows, window samples)``, the labels, and
    the fold."""
    _, config, labels = load_model(run)
    fold = config.data.test_fold if fold is None else fold
    if fold is None:
        sys.exit(f"{run}: the run has no test fold; give --fold")
    clipset = load_clips(replace(config.data, root=data))
    if clipset.classes != labels:
        sys.exit(f"{data}: its classes are not the ones {run} was trained on")
    clips = [c for c in clipset.clips if c.fold == fold]
    window = config.features.n_samples
    waves = [np.stack([w for _, w in prepare(c.path, None, config.features, window, default_hop(window)).windows])
             for c in tqdm(clips, desc=f"decode fold {fold}", unit="clip")]
    return waves, np.array([c.label for c in clips]), fold


def engines(run: Path, folder: Path) -> dict:
    """Engine name -> a function from a batch of windows ``(n, samples)`` to probabilities ``(n, classes)``,
    and the model file sizes in bytes."""
    import onnxruntime as ort

    model, config, _ = load_model(run)
    net = WaveformClassifier(config.features, model, config.train.task).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()

    def onnx(path: Path):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    def pytorch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    paths = {q: export(run, "onnx", folder / q, quantize=None if q == "fp32" else q) for q in ("fp32", "int8")}
    for p in paths.values():
        meta = json.loads((p.parent / "config.json").read_text())
        if meta["input"] != "waveform":
            sys.exit(f"{run}: the ONNX export fell back to log-mel input; this benchmark feeds waveforms")
    sizes = {"pytorch fp32": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
             "onnx fp32": paths["fp32"].stat().st_size, "onnx int8": paths["int8"].stat().st_size}
    return {"pytorch fp32": pytorch, "onnx fp32": onnx(paths["fp32"]), "onnx int8": onnx(paths["int8"])}, sizes


def latency_ms(fn, x: np.ndarray, repeats: int) -> float:
    fn(x)  # warm-up: onnxruntime plans its kernels on the first run
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(run: Path, data: str, fold: int | None, repeats: int) -> dict:
    waves, labels, fold = test_windows(run, data, fold)
    flat = np.concatenate(waves)
    bounds = np.cumsum([0] + [len(w) for w in waves])
    with tempfile.TemporaryDirectory(prefix="audioclf-quantize-") as tmp:
        fns, sizes = engines(run, Path(tmp))
        out = {"run": str(run), "fold": fold, "clips": len(waves), "engines": {}}
        top1 = {}
        for name, fn in fns.items():
            probs = np.concatenate([fn(flat[i:i + BATCH]) for i in range(0, len(flat), BATCH)])
            clip_probs = np.stack([probs[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
            top1[name] = clip_probs.argmax(axis=1)
            out["engines"][name] = {
                "accuracy": float((top1[name] == labels).mean()),
                "agree_with_pytorch": float((top1[name] == top1["pytorch fp32"]).mean()),
                "ms_batch1": latency_ms(fn, flat[:1], repeats),
                "ms_per_window_batch32": latency_ms(fn, flat[:BATCH], max(3, repeats // 4)) / min(BATCH, len(flat)),
                "model_mb": sizes[name] / 2**20}
    return out


def machine() -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model; platform.processor() often gives only the architecture
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, no GPU")


def table(results: list[dict]) -> str:
    lines = ["| engine | accuracy | agrees with PyTorch | 1 window (ms) | per window in a batch of 32 (ms) | model (MB) |",
             "|---|---|---|---|---|---|"]
    for name in ENGINES:
        rows = [r["engines"][name] for r in results]
        mean = {k: statistics.mean(row[k] for row in rows) for k in rows[0]}
        acc = f"{mean['accuracy']:.3f}" + (f" ± {statistics.stdev(r['accuracy'] for r in rows):.3f}" if len(rows) > 1 else "")
        lines.append(f"| {name} | {acc} | {mean['agree_with_pytorch']:.3f} | {mean['ms_batch1']:.1f} | "
                     f"{mean['ms_per_window_batch32']:.2f} | {mean['model_mb']:.2f} |")
    folds = ", ".join(str(r["fold"]) for r in results)
    return "\n".join(lines) + (f"\n\n{date.today()}; test fold(s) {folds}, {sum(r['clips'] for r in results)} clips; "
                               f"{machine()}; audioclf {audioclf.__version__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="training run directories (best.pt, config.yaml)")
    p.add_argument("--data", required=True, help="the dataset the runs were trained on, e.g. ESC-50/")
    p.add_argument("--fold", type=int, help="test fold (default: each run's data.test_fold)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per latency (default 30)")
    p.add_argument("--json", action="store_true", help="print the results as JSON, not a table")
    args = p.parse_args(argv)
    results = [measure(run, args.data, args.fold, args.repeats) for run in args.runs]
    print(json.dumps({"machine": machine(), "results": results}, indent=1) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
