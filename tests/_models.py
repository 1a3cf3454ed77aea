"""A tiny trained model for the inference tests: conftest's synthetic chirp / noise / tone clips, a plain
training loop.

Import the fixture into a test module (``from _models import tiny_run``); the model is trained once per
session, whichever module asks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from audioclf.audio import fix_length, load_audio
from audioclf.checkpoint import inference_state, save_checkpoint
from audioclf.config import DataConfig, FeatureConfig, ModelConfig, RunConfig
from audioclf.data import load_clips
from audioclf.features import LogMel
from audioclf.model import AudioResNet

# Deliberately not the defaults (80 mels, n_fft 1024): inference must take them from the checkpoint.
FEATURES = FeatureConfig(sample_rate=16000, duration_s=1.0, n_mels=32, n_fft=512, hop_length=512, win_length=512)


@dataclass
class TinyRun:
    run_dir: Path  # holds best.pt
    data_dir: Path  # <class>/<class>_NNN.wav, the clips it was trained on (conftest's synth_dir, 12 per class)
    labels: list


def train_tiny(out_dir, data_dir, steps: int = 40, seed: int = 0) -> Path:
    """Train an AudioResNet on the folder dataset ``data_dir`` and save ``out_dir/best.pt``."""
    torch.manual_seed(seed)
    clipset = load_clips(DataConfig(root=str(data_dir)))
    config = RunConfig(data=DataConfig(root=str(data_dir)), features=FEATURES,
                       model=ModelConfig(pretrained="none", dropout=0.0))
    waves = torch.stack([torch.from_numpy(fix_length(load_audio(c.path, FEATURES.sample_rate), FEATURES.n_samples))
                         for c in clipset.clips])
    with torch.no_grad():
        x = LogMel(FEATURES)(waves)  # (clips, n_mels, frames)
    y = torch.tensor([c.label for c in clipset.clips])
    model = AudioResNet.from_config(config.model, len(clipset.classes), FEATURES.n_mels)
    model.norm.fit(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second OpenMP thread only waits, and on a busy machine stalls
    try:
        for _ in range(steps):
            idx = torch.randperm(len(y))[:8]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    path = Path(out_dir) / "best.pt"
    save_checkpoint(inference_state(model.eval(), config, clipset.classes), path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_dir) -> TinyRun:
    run_dir = tmp_path_factory.getbasetemp() / "tiny_run"
    if not (run_dir / "best.pt").is_file():  # imported into several modules: each asks, the first trains
        train_tiny(run_dir, synth_dir)
    return TinyRun(run_dir, synth_dir, sorted(p.name for p in synth_dir.iterdir()))
