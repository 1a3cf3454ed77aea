"""Live listening benchmark: ``audioclf serve mn04_as`` hears ESC-50 clips streamed in real time on
``/listen``, as a microphone would send them.

    python benchmarks/listen.py ESC-50/ --weights mn04_as_mAP_432.pt [--clips 8] [--load-s 30] [--json]

- **latency**: a recording of clips between stretches of quiet (6 s) streams in 0.1-s chunks at real-time
  pace; a clip's onset is where its short-time energy first reaches a tenth of its peak. Latency is the
  wall time from the moment that sample was "recorded" (the stream's start plus its time) to the arrival
  of the event it opens: chunking, the network, the hop, the median filter and the minimum duration
  included. The event is the one offline detect finds first near the onset (within 1 s), of that label.
- **agreement**: the stream's closed events against ``audioclf detect``'s on the same recording: how many
  have a partner of the same label with onset and offset within one hop.
- **load**: p50/p99 of a 1-s ``/predict`` request, alone and while 4 listeners stream in real time.

The server is a separate process (``python -m audioclf serve mn04_as``; the weights reach it through a
temporary torch hub cache), on the cores this process may use.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port  # noqa: E402  (benchmarks/serve.py)

from audioclf.audio import load_audio  # noqa: E402
from audioclf.events import DetectConfig, find_events, probability_track  # noqa: E402
from audioclf.options import ServeLimits  # noqa: E402

SR = 32000  # mn04_as
CHUNK_S = 0.1
QUIET_S = 6.0
# kinds of sound with a clear start, one clip each from ESC-50's fold 1
CATEGORIES = ["dog", "rooster", "church_bells", "siren", "crying_baby", "door_wood_knock", "cow", "clock_alarm",
              "glass_breaking", "cat", "car_horn", "hen"]


def scene(esc50: Path, n_clips: int, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Quiet, clip, quiet, clip, ...: the waveform at SR and each clip's onset (s)."""
    rows = list(csv.DictReader(open(esc50 / "meta" / "esc50.csv")))
    rng = np.random.default_rng(seed)
    parts, onsets, t = [], [], 0.0
    for category in CATEGORIES[:n_clips]:
        row = next(r for r in rows if r["category"] == category and r["fold"] == "1")
        clip = load_audio(esc50 / "audio" / row["filename"], SR)
        quiet = (rng.normal(0, 1e-3, int(QUIET_S * SR))).astype(np.float32)  # -60 dBFS: a quiet room
        energy = np.convolve(clip ** 2, np.ones(320) / 320, mode="same")  # 10-ms energy
        onsets.append(t + QUIET_S + int(np.argmax(energy >= 0.1 * energy.max())) / SR)
        parts += [quiet, clip]
        t += QUIET_S + len(clip) / SR
    parts.append(np.zeros(int(QUIET_S * SR), np.float32))
    return np.concatenate(parts), onsets


def start_server(weights: Path, port: int, log_path: Path, hub: Path) -> subprocess.Popen:
    (hub / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = hub / "hub" / "checkpoints" / "mn04_as_mAP_432.pt"
    if not link.exists():
        link.symlink_to(weights.resolve())
    cmd = [sys.executable, "-m", "audioclf", "serve", "mn04_as", "--port", str(port), "--device", "cpu",
           "--max-listeners", "8"]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TORCH_HOME": str(hub)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not start")


def stream(url: str, wave: np.ndarray, seconds: float = None, stop: bool = True) -> tuple[float, list]:
    """Stream ``wave`` (looped up to ``seconds``) at real-time pace; returns the wall time of sample 0 and
    every message with its arrival time."""
    import websocket  # websocket-client (selenium's dependency, in the dev extra)

    ws = websocket.create_connection(url.replace("http", "ws") + "/listen", timeout=30)
    ws.send(json.dumps({"sample_rate": SR, "dtype": "float32"}))
    assert json.loads(ws.recv())["type"] == "ready"
    messages = []

    def receive():
        while True:
            try:
                m = json.loads(ws.recv())
            except Exception:
                return
            messages.append((time.monotonic(), m))
            if m["type"] in ("end", "error"):
                return

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    n = int(SR * CHUNK_S)
    total = len(wave) if seconds is None else int(seconds * SR)
    t0 = time.monotonic()
    for i in range(0, total, n):
        chunk = np.resize(np.roll(wave, -(i % len(wave))), n) if seconds else wave[i:i + n]
        # a microphone hands over a chunk once it is recorded: at the stream's time of its last sample
        time.sleep(max(0.0, t0 + (i + len(chunk)) / SR - time.monotonic()))
        ws.send_binary(chunk.astype("<f4").tobytes())
    if stop:
        ws.send(json.dumps({"type": "stop"}))
    reader.join(60)
    ws.close()
    return t0, messages


def latency_and_agreement(url: str, wave: np.ndarray, onsets: list, offline: list, hop_s: float) -> dict:
    t0, messages = stream(url, wave)
    opened = [(at, e) for at, m in messages if m["type"] == "hop" for e in m["events"] if e["state"] == "open"]
    closed = [e for _, m in messages if m["type"] == "hop" for e in m["events"] if e["state"] == "close"]
    latencies = []
    for onset in onsets:
        target = next((e for e in offline if abs(e.onset - onset) <= 1.0), None)
        seen = next((at for at, e in opened if target and e["label"] == target.event_label
                     and abs(e["onset"] - target.onset) <= 1.0), None)
        latencies.append(np.nan if seen is None else seen - (t0 + onset))
    matched = sum(any(c["label"] == e.event_label and abs(c["onset"] - e.onset) <= hop_s
                      and abs(c["offset"] - e.offset) <= hop_s for c in closed) for e in offline)
    lat = np.array(latencies)
    return {"clips": len(onsets), "detected": int(np.isfinite(lat).sum()),
            "latency_median_s": float(np.nanmedian(lat)), "latency_max_s": float(np.nanmax(lat)),
            "offline_events": len(offline), "stream_events": len(closed), "matched_within_hop": int(matched)}


def request_latency(url: str, clip: bytes, seconds: float) -> list:
    out, end = [], time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < end:
            t = time.monotonic()
            r = client.post(f"{url}/predict", files={"file": ("clip.wav", clip, "audio/wav")})
            r.raise_for_status()
            out.append(time.monotonic() - t)
            time.sleep(0.1)
    return out


def screenshot(url: str, wave: np.ndarray, png: Path, tmp: Path, seconds: float = 40.0) -> None:
    """The page hearing ``wave`` through Chromium's fake microphone, saved as ``png`` (needs /usr/bin/chromium,
    chromedriver and selenium)."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    sf.write(tmp / "mic.wav", wave, SR, subtype="PCM_16")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={tmp / 'mic.wav'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        driver.get(url + "/")
        time.sleep(2)
        driver.find_element(By.ID, "listen-button").click()
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(driver.find_elements(By.CSS_SELECTOR, "#live-log tr.ev")) < 4:
            time.sleep(0.5)
        driver.execute_script("document.getElementById('live-title').scrollIntoView()")
        driver.save_screenshot(str(png))
    finally:
        driver.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("esc50", type=Path, help="ESC-50 folder (meta/esc50.csv, audio/)")
    p.add_argument("--weights", type=Path, required=True, help="mn04_as_mAP_432.pt")
    p.add_argument("--clips", type=int, default=8, help="clips in the latency recording")
    p.add_argument("--load-s", type=float, default=30.0, help="seconds of each load measurement")
    p.add_argument("--screenshot", type=Path, help="also save the page listening to the recording as this PNG")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    wave, onsets = scene(args.esc50, args.clips)
    import audioclf

    clf = audioclf.load("mn04_as", "cpu", weights_path=str(args.weights))
    config = DetectConfig()
    duration_s, track = probability_track(clf, wave, config)
    offline = find_events(track, clf.labels, config, filename="scene", duration_s=duration_s)
    del clf, track
    buf = io.BytesIO()
    sf.write(buf, wave[int(QUIET_S * SR):int((QUIET_S + 1) * SR)], SR, format="WAV")  # 1 s of the first clip
    one_s = buf.getvalue()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(args.weights, port, Path(tmp) / "server.log", Path(tmp))
        url = f"http://127.0.0.1:{port}"
        try:
            result = latency_and_agreement(url, wave, onsets, offline, ServeLimits.listen_hop_s)
            alone = request_latency(url, one_s, args.load_s)
            listeners = [threading.Thread(target=stream, args=(url, wave, args.load_s + 5, False)) for _ in range(4)]
            for t in listeners:
                t.start()
            time.sleep(2)
            loaded = request_latency(url, one_s, args.load_s)
            for t in listeners:
                t.join()
            if args.screenshot:
                screenshot(url, wave, args.screenshot, Path(tmp))
        finally:
            server.terminate()
            server.wait(30)
    result.update({"predict_1s_alone_p50_ms": 1000 * float(np.percentile(alone, 50)),
                   "predict_1s_alone_p99_ms": 1000 * float(np.percentile(alone, 99)),
                   "predict_1s_4_listeners_p50_ms": 1000 * float(np.percentile(loaded, 50)),
                   "predict_1s_4_listeners_p99_ms": 1000 * float(np.percentile(loaded, 99)),
                   "requests": [len(alone), len(loaded)], "detect": config.__dict__,
                   "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                              f"torch {torch.__version__}"})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"| measure | value |\n|---|---|\n"
          f"| clips detected live (of {result['clips']}) | {result['detected']} |\n"
          f"| latency onset -> event, median (max) | {result['latency_median_s']:.2f} s ({result['latency_max_s']:.2f} s) |\n"
          f"| stream events matching detect within one hop | {result['matched_within_hop']} of "
          f"{result['offline_events']} (stream: {result['stream_events']}) |\n"
          f"| 1-s /predict p50 / p99, alone | {result['predict_1s_alone_p50_ms']:.0f} / "
          f"{result['predict_1s_alone_p99_ms']:.0f} ms |\n"
          f"| 1-s /predict p50 / p99, 4 listeners streaming | {result['predict_1s_4_listeners_p50_ms']:.0f} / "
          f"{result['predict_1s_4_listeners_p99_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
