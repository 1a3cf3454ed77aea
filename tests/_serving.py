"""Helpers for the serving and export tests: an untrained checkpoint, WAV bytes, a live uvicorn server."""

from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch

from audioclf.checkpoint import inference_state, save_checkpoint
from audioclf.config import FeatureConfig, RunConfig
from audioclf.demo import synth_clip
from audioclf.features import LogMel
from audioclf.model import AudioResNet

LABELS = ["chirp", "clicks", "noise", "tone", "warble"]  # also the synth_clip kinds
SAMPLE_RATE = 16000  # Hz
DURATION_S = 1.0  # the model's window


def make_checkpoint(path: Path) -> Path:
    """An untrained AudioResNet whose normalisation is fitted on one clip per class, saved as ``path``."""
    features = FeatureConfig(sample_rate=SAMPLE_RATE, duration_s=DURATION_S)
    torch.manual_seed(0)
    model = AudioResNet.from_config(RunConfig().model, len(LABELS), features.n_mels)
    rng = np.random.default_rng(0)
    logmel = LogMel(features)
    model.norm.fit(logmel(torch.from_numpy(synth_clip(k, rng, SAMPLE_RATE, DURATION_S))) for k in LABELS)
    save_checkpoint(inference_state(model.eval(), RunConfig(features=features), LABELS), path)
    return path


def clip(kind: str, seed: int = 0, duration_s: float = DURATION_S) -> np.ndarray:
    return synth_clip(kind, np.random.default_rng(seed), SAMPLE_RATE, duration_s)


def wav_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A float WAV file: it decodes to exactly ``wave``, so answers can be compared with in-memory inference."""
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An untrained checkpoint (``make_checkpoint``), one per test module."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="module")
def safetensors_dir(model_path, tmp_path_factory) -> Path:
    """``model_path`` exported as safetensors, one per test module."""
    pytest.importorskip("safetensors")
    from audioclf.export import export

    out = tmp_path_factory.mktemp("st")
    assert export(model_path, "safetensors", out) == out / "model.safetensors"
    return out


@pytest.fixture(scope="module")
def classifier(model_path):
    import audioclf

    return audioclf.load(model_path, device="cpu")


@contextmanager
def live_server(app, timeout_s: float = 30.0, **options) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port the OS picks) in a thread; yield its base URL.
    ``options`` go to ``uvicorn.Config`` (timeouts, connection limits)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
