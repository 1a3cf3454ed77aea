"""Serving benchmark: requests/s and latency of ``audioclf serve`` for 5-s clips from concurrent loopback
clients; the latency of 1-s clips while a 10-min file is classified, against idle; and onnxruntime vs
PyTorch CPU latency for one 5-s clip (waveform -> probabilities).

    python benchmarks/serve.py [--model RUN_DIR] [--clients 1 4 16] [--requests 64] [--parts ...] [--json]

The server runs as a separate process (``python -m audioclf serve``) on a free 127.0.0.1 port, so the
clients do not share its interpreter. Nothing is trained: without ``--model`` an untrained model with the
default feature config (22.05 kHz, 5-s window, 80 mels) is built in a temporary folder; speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

import audioclf
from audioclf.audio import fix_length
from audioclf.checkpoint import inference_state, load_model, save_checkpoint
from audioclf.config import ModelConfig, RunConfig
from audioclf.demo import synth_clip
from audioclf.export import export
from audioclf.model import AudioResNet, WaveformClassifier

CLIP_S = 5.0
SHORT_S, LONG_S = 1.0, 600.0  # the short clips and the long file of the "while a long file" round
PARTS = ("serve", "long", "engines")


def untrained_model(folder: Path, n_classes: int = 10) -> Path:
    config = RunConfig(model=ModelConfig(pretrained="none"))
    model = AudioResNet.from_config(config.model, n_classes, config.features.n_mels).eval()
    path = folder / "best.pt"
    save_checkpoint(inference_state(model, config, [f"class_{i}" for i in range(n_classes)]), path)
    return path


def wav_file(wave: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, log_path: Path, timeout_s: float = 180.0, flags: tuple = (),
                 env: dict = None) -> subprocess.Popen:
    """``audioclf serve model`` (with ``flags``, in ``env``) as a process, once it answers /health."""
    cmd = [sys.executable, "-m", "audioclf", "serve", str(model), "--port", str(port), "--device", "cpu", *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s")


def percentiles_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def load_test(url: str, wav: bytes, clients: int, requests: int) -> dict:
    """``requests`` POST /predict calls spread over ``clients`` threads, each waiting for its answer."""
    def one(_):
        t0 = time.perf_counter()
        try:
            ok = http.post("/predict", files={"file": ("clip.wav", wav, "audio/wav")}).status_code == 200
        except httpx.HTTPError:
            ok = False
        return ok, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as http:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients)))  # warm-up: connections and first inferences
            t0 = time.perf_counter()
            results = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
    latencies = [dt for ok, dt in results if ok]
    return {"clients": clients, "requests": requests, "failed": requests - len(latencies),
            "req_per_s": round(len(latencies) / wall, 2), **percentiles_ms(latencies or [float("nan")])}


def while_long_file(url: str, short_wav: bytes, long_wav: bytes, requests: int) -> dict:
    """Latency of one client's short clips, one after another: ``requests`` of them on an idle server, then
    as many as fit while another client's long file is being classified."""
    def one(http, wav, name):
        t0 = time.perf_counter()
        status = http.post("/predict", files={"file": (name, wav, "audio/wav")}).status_code
        if status != 200:
            raise RuntimeError(f"POST {name}: HTTP {status}")
        return time.perf_counter() - t0

    with httpx.Client(base_url=url, timeout=600) as http, httpx.Client(base_url=url, timeout=600) as other:
        one(http, short_wav, "short.wav")  # warm-up
        idle = [one(http, short_wav, "short.wav") for _ in range(requests)]
        with ThreadPoolExecutor(1) as pool:
            long_job = pool.submit(one, other, long_wav, "long.wav")
            time.sleep(1.0)  # the long file is uploaded and its windows are running
            busy = []
            while not long_job.done():
                busy.append(one(http, short_wav, "short.wav"))
            long_s = long_job.result()
    return {"idle": {"requests": len(idle), **percentiles_ms(idle)},
            "busy": {"requests": len(busy), **percentiles_ms(busy or [float("nan")])},
            "long_file_s": round(long_s, 1)}


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def engines(model_path: Path, wave: np.ndarray, folder: Path, repeats: int, threads: int) -> list[dict]:
    """PyTorch vs onnxruntime, CPU, ``threads`` intra-op threads each, for the same (1, window) waveform."""
    import onnxruntime as ort

    torch.set_num_threads(threads)

    model, config, _ = load_model(model_path)
    x = fix_length(wave, config.features.n_samples)[None]  # (1, samples)
    net = WaveformClassifier(config.features, model).eval()

    def torch_call():
        with torch.inference_mode():
            net(torch.from_numpy(x))

    onnx_path = export(model_path, "onnx", folder / "onnx")
    input_kind = json.loads((folder / "onnx" / "config.json").read_text())["input"]
    if input_kind != "waveform":
        raise RuntimeError("the ONNX export fell back to log-mel input: no like-for-like timing")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rows = [{"engine": f"PyTorch {torch.__version__}", **percentiles_ms(time_calls(torch_call, repeats))},
            {"engine": f"onnxruntime {ort.__version__}",
             **percentiles_ms(time_calls(lambda: session.run(None, {"waveform": x}), repeats))}]
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"audioclf {m['audioclf']}, {m['cpus']} CPU cores ({m['cpu']}), server torch threads {m['torch_threads']}, "
             f"model: {m['model']}, clip: {CLIP_S:g} s at {m['sample_rate']} Hz"]
    if result["serve"]:
        lines += ["", "| clients | requests | failed | req/s | p50 latency (ms) | p99 latency (ms) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['req_per_s']:.1f} | {r['p50_ms']:.0f} | "
                  f"{r['p99_ms']:.0f} |" for r in result["serve"]]
    if "long" in result:
        r = result["long"]
        lines += ["", "| 1-s clips, one client, one after another | requests | p50 latency (ms) | p99 latency (ms) |",
                  "|---|---:|---:|---:|",
                  f"| idle server | {r['idle']['requests']} | {r['idle']['p50_ms']:.0f} | {r['idle']['p99_ms']:.0f} |",
                  f"| while another client's {LONG_S / 60:g}-min file is classified ({r['long_file_s']:g} s) | "
                  f"{r['busy']['requests']} | {r['busy']['p50_ms']:.0f} | {r['busy']['p99_ms']:.0f} |"]
    if not result["engines"]:
        return "\n".join(lines)
    lines += ["", f"| one {m['window_s']:g}-s window, CPU ({m['engine_threads']} thread(s)), waveform -> "
              f"probabilities | p50 (ms) | p99 (ms) |",
              "|---|---:|---:|"]
    lines += [f"| {r['engine']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in result["engines"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="run directory, .pt or safetensors export (default: an untrained model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per round")
    p.add_argument("--requests", type=int, default=64, help="requests per round (after a warm-up)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per engine")
    # One thread by default: a like-for-like comparison that other load on the machine disturbs least.
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the engine comparison")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="serve: concurrent clients; long: short clips while a long file runs; engines: PyTorch vs ONNX")
    p.add_argument("--short-requests", type=int, default=30, help="short clips timed on the idle server")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown tables")
    args = p.parse_args(argv)
    server_threads = torch.get_num_threads()  # what the server process uses; the engines set their own

    with tempfile.TemporaryDirectory(prefix="audioclf-bench-") as tmp:
        tmp = Path(tmp)
        model_path = Path(args.model) if args.model else untrained_model(tmp)
        config = load_model(model_path)[1]
        sr = config.features.sample_rate
        wave = synth_clip("warble", np.random.default_rng(0), sr, CLIP_S)

        port = free_port()
        server = start_server(model_path, port, tmp / "server.log")
        url = f"http://127.0.0.1:{port}"
        try:
            serve_rows = [load_test(url, wav_file(wave, sr), c, args.requests) for c in args.clients] \
                if "serve" in args.parts else []
            long = while_long_file(url, wav_file(synth_clip("tone", np.random.default_rng(1), sr, SHORT_S), sr),
                                   wav_file(synth_clip("warble", np.random.default_rng(2), sr, LONG_S), sr),
                                   args.short_requests) if "long" in args.parts else None
        finally:
            server.terminate()
            server.wait(30)
        engine_rows = engines(model_path, wave, tmp, args.repeats, args.threads) if "engines" in args.parts else []

    result = {"machine": {"audioclf": audioclf.__version__, "cpus": os.cpu_count(), "cpu": platform.processor()
                          or platform.machine(), "torch_threads": server_threads,
                          "model": str(args.model or "untrained, default features"), "sample_rate": sr,
                          "window_s": config.features.duration_s, "engine_threads": args.threads},
              "serve": serve_rows, "engines": engine_rows, **({"long": long} if long else {})}
    print(json.dumps(result) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
