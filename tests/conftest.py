"""Shared fixtures: a small synthetic dataset, a WAV writer, the shared real-data folders, and an
environment that keeps every test away from ~/.cache and the network."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclf.demo import make_synthetic_dataset

# ../shared/data next to the repository: real datasets, present on some machines only.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ESC50 = SHARED_DATA / "esc50"  # ESC-10 subset, folds 1-4 (see its README.md)
FSDD = SHARED_DATA / "fsdd"

SYNTH_CLASSES = ("chirp", "noise", "tone")  # sorted, as read_folder names them
SYNTH_PER_CLASS = 12
SYNTH_SAMPLE_RATE = 16000  # Hz
SYNTH_DURATION_S = 1.0


def require(folder: Path) -> Path:
    """Skip the calling test (cleanly, with a reason) when a shared data folder is absent."""
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent")
    return folder


@pytest.fixture
def esc50_root() -> Path:
    return require(ESC50)


@pytest.fixture
def fsdd_root() -> Path:
    return require(FSDD)


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audioclf_cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory, _session_cache):
    """Feature cache in a per-session temp dir; an empty per-test TORCH_HOME; no downloads.

    With no network, ``pretrained="auto"`` falls back to scratch at once instead of trying (and, on a
    machine with internet, succeeding at) a 45 MB download. A test that wants a download path to behave
    differently monkeypatches ``torch.hub.download_url_to_file`` itself.
    """
    import torch.hub

    monkeypatch.setenv("AUDIOCLF_CACHE", str(_session_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))

    def no_download(url, *args, **kwargs):
        raise urllib.error.URLError(f"downloads are disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """``<tmp>/synth/<class>/<class>_NNN.wav``: 3 classes x 12 clips, 16 kHz, 1.0 s (read-only: share it)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_per_class=SYNTH_PER_CLASS,
                                  classes=SYNTH_CLASSES, sample_rate=SYNTH_SAMPLE_RATE,
                                  duration_s=SYNTH_DURATION_S, seed=0)


@pytest.fixture
def write_wav(tmp_path):
    """Factory: ``write_wav(data, sample_rate=16000, name="clip.wav", channels=None, subtype=None) -> Path``.

    ``data`` is (time,) or (time, channels); ``channels`` tiles 1-D data across that many channels;
    ``subtype`` is a soundfile subtype such as ``"FLOAT"`` (default: soundfile's, 16-bit PCM for WAV).
    """
    def write(data, sample_rate: int = 16000, name: str = "clip.wav", channels=None, subtype=None) -> Path:
        data = np.asarray(data)
        if channels is not None:
            data = np.tile(data.reshape(-1, 1), (1, channels))
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, data, sample_rate, subtype=subtype)
        return path

    return write


def tone(freq_hz: float, sample_rate: int, duration_s: float, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine wave."""
    t = np.arange(int(round(sample_rate * duration_s))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def chirp_noise(sample_rate: int, duration_s: float, seed: int = 0) -> np.ndarray:
    """A rising chirp (200 Hz -> 4 kHz) plus white noise: broadband, non-stationary test audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sample_rate * duration_s))) / sample_rate
    y = 0.5 * np.sin(2 * np.pi * (200 * t + (4000 - 200) * t ** 2 / (2 * duration_s)))
    return (y + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
