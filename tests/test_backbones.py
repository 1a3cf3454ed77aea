"""The AudioSet MobileNets: the architecture against the official weights, their front end, where the
weights come from, and the backbone travelling with a model through training, saving, export and embedding."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from audioclf import backbones, weights
from audioclf.audio import load_audio
from audioclf.backbones import BACKBONES
from audioclf.checkpoint import inference_state, load_model, save_checkpoint
from audioclf.config import AudioclfError, ModelConfig, RunConfig, resolve
from audioclf.features import LogMel, kaldi_mel_filterbank
from audioclf.fileio import sha256
from audioclf.mobilenet import MobileNet
from audioclf.model import AudioMobileNet, build_model, build_network
from audioclf.predict import load
from _models import tiny_run  # noqa: F401 (a fixture)
from conftest import ESC50, tone

SHARED_WEIGHTS = ESC50.parents[1] / "weights"
MN04 = SHARED_WEIGHTS / "mn04_as_mAP_432.pt"
AUDIOSET_LABELS = (Path(__file__).parent / "fixtures" / "audioset_labels.txt").read_text().splitlines()


@pytest.fixture
def mn04_file() -> Path:
    if not MN04.is_file():
        pytest.skip(f"{MN04} is absent")
    return MN04


def mn04_config(**model) -> RunConfig:
    return resolve(overrides={"model": {"backbone": "mn04_as", **model}})


# -------------------------------------------------------------------------------- the official weights

@pytest.mark.shared_data
def test_mn04_as_loads_the_official_file_strictly(mn04_file):
    sd = torch.load(mn04_file, map_location="cpu", weights_only=True)
    net = MobileNet(0.4, dropout=0.0, pooling="mean")
    assert len(sd) == len(net.state_dict()) == 312
    net.load_state_dict(sd, strict=True)  # every key and shape
    assert sum(p.numel() for p in net.parameters()) == 983_599
    assert sha256(mn04_file) == BACKBONES["mn04_as"].sha256


def _audioset_top3(path: Path) -> list[str]:
    net = MobileNet(0.4, dropout=0.0, pooling="mean")
    net.load_state_dict(torch.load(MN04, map_location="cpu", weights_only=True))
    features = mn04_config().features
    wave = torch.from_numpy(load_audio(path, features.sample_rate))[None]
    with torch.no_grad():
        probs = torch.sigmoid(net.eval()(LogMel(features)(wave).unsqueeze(1)))[0]
    return [AUDIOSET_LABELS[i] for i in probs.topk(3).indices.tolist()]


@pytest.mark.shared_data
@pytest.mark.parametrize("clip, expected", [
    ("1-100032-A-0.flac", {"Bark", "Dog"}),  # dog
    ("1-26806-A-1.flac", {"Crowing, cock-a-doodle-doo", "Chicken, rooster"}),  # rooster
    ("1-17367-A-10.flac", {"Rain", "Rain on surface"}),  # rain
    ("1-28135-A-11.flac", {"Waves, surf", "Ocean"}),  # sea waves
    ("1-116765-A-41.flac", {"Chainsaw"}),  # chainsaw
])
def test_the_pretrained_head_tags_real_clips_through_our_front_end(mn04_file, esc50_root, clip, expected):
    """Our front end is the one the weights were trained on: a wrong window, mel scale or normalisation
    turns the dog's "Bark" (0.71) into noise."""
    assert expected & set(_audioset_top3(esc50_root / "audio" / clip))


def test_widths_give_the_published_sizes():
    # EfficientAT's published parameter counts (millions) for the family
    for name, millions in {"mn10_as": 4.88, "mn40_as": 68.43}.items():
        n = sum(p.numel() for p in MobileNet(BACKBONES[name].width, dropout=0.0, pooling="mean").parameters())
        assert round(n / 1e6, 2) == millions


# -------------------------------------------------------------------------------- the front end

def _kaldi_by_definition(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Kaldi's mel banks written from their definition, one filter and one bin at a time."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(f_min), mel(f_max)
    delta = (hi - lo) / (n_mels + 1)
    out = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        for k in range(n_fft // 2):  # Kaldi leaves the Nyquist bin out
            x = mel(k * sr / n_fft)
            if left < x < right:
                out[m, k] = (x - left) / (centre - left) if x <= centre else (right - x) / (right - centre)
    return out


@pytest.mark.parametrize("sr, n_fft, n_mels, f_min, f_max", [(32000, 1024, 128, 0.0, 15000.0), (16000, 512, 40, 20.0, 7600.0)])
def test_kaldi_mel_matrix_matches_its_definition(sr, n_fft, n_mels, f_min, f_max):
    ours = kaldi_mel_filterbank(sr, n_fft, n_mels, f_min, f_max)
    assert ours.shape == (n_mels, n_fft // 2 + 1) and not ours[:, -1].any()
    np.testing.assert_allclose(ours, _kaldi_by_definition(sr, n_fft, n_mels, f_min, f_max), atol=1e-6)


def test_the_front_end_is_chosen_by_the_backbone():
    f = mn04_config().features
    assert (f.sample_rate, f.n_mels, f.hop_length, f.win_length, f.window, f.mel_scale, f.preemphasis,
            f.compression, f.offset, f.scale, f.f_max) == (32000, 128, 320, 800, "symmetric", "kaldi", 0.97, "log",
                                                           4.5, 5.0, 15000.0)
    # (x + 4.5) / 5 of log(mel + 1e-5): silence is log(1e-5) = -11.5 -> -1.40
    silence = LogMel(f)(torch.zeros(1, 32000))
    assert torch.allclose(silence, torch.full_like(silence, (math.log(1e-5) + 4.5) / 5), atol=1e-4)
    assert resolve(overrides={"model": {"backbone": "resnet18"}}).features.mel_scale == "slaney"  # the seed's librosa features
    assert resolve().model.backbone == "mn04_as"  # the default preset


def test_flags_that_contradict_a_pretrained_front_end_are_refused():
    with pytest.raises(AudioclfError, match=r"features.n_mels=64 contradicts the front end .*n_mels=128.*--pretrained none"):
        resolve(overrides={"model": {"backbone": "mn04_as"}, "features": {"n_mels": 64}})
    with pytest.raises(AudioclfError, match="sample_rate=22050"):
        resolve(overrides={"model": {"backbone": "mn04_as"}, "features": {"sample_rate": 22050}})
    scratch = resolve(overrides={"model": {"backbone": "mn04_as", "pretrained": "none"}, "features": {"n_mels": 64}})
    assert scratch.features.n_mels == 64
    # settings outside the front end stay free
    assert resolve(overrides={"model": {"backbone": "mn04_as"}, "features": {"duration_s": 2.0}}).features.duration_s == 2.0


def test_a_pretrained_kind_the_backbone_lacks_is_refused():
    with pytest.raises(AudioclfError, match="pretrained='imagenet' does not exist for backbone='mn04_as'"):
        ModelConfig(backbone="mn04_as", pretrained="imagenet")
    with pytest.raises(AudioclfError, match="Unsupported backbone='vgg'"):
        resolve(overrides={"model": {"backbone": "vgg"}})


# -------------------------------------------------------------------------------- where weights come from

def test_offline_with_nothing_cached_names_file_url_and_place(monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("Name or service not known")))
    b = BACKBONES["mn04_as"]
    with pytest.raises(AudioclfError) as e:
        weights.weights_file("mn04_as")
    msg = str(e.value)
    assert b.weights_file in msg and b.weights_url in msg and str(weights.hub_path(b)) in msg
    assert "Name or service not known" in msg and "--pretrained none" in msg


def test_auto_falls_back_to_scratch_and_says_so(caplog):
    model, pretrained = build_model(mn04_config().model, 3, 128)
    assert not pretrained and isinstance(model, AudioMobileNet)
    assert "training mn04_as from scratch instead" in caplog.text


@pytest.mark.parametrize("name", ["mn04_as", "mn10_as", "resnet18"])  # resnet18: only a prefix is pinned
def test_a_file_with_another_hash_is_refused(tmp_path, name):
    b = BACKBONES[name]
    fake = tmp_path / b.weights_file
    torch.save(MobileNet(b.width, dropout=0.0, pooling="mean").state_dict(), fake)
    with pytest.raises(AudioclfError, match=f"sha256 .* is not that of the official {b.weights_file}"):
        weights.weights_file(name, str(fake))


def test_the_hub_cache_is_used_and_a_download_lands_there(monkeypatch):
    b = BACKBONES["mn05_as"]  # no pinned hash: any state dict of the right shapes is taken
    sd = MobileNet(b.width, dropout=0.0, pooling="mean").state_dict()

    def fake_download(url, dst, **kwargs):
        assert url == b.weights_url
        torch.save(sd, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert weights.status("mn05_as") == "downloadable"
    path = weights.weights_file("mn05_as")
    assert path == weights.hub_path(b) and weights.status("mn05_as") == "cached"
    model, pretrained = build_model(ModelConfig(backbone="mn05_as"), 4, 128)
    assert pretrained
    assert torch.equal(model.net.features[3].block[0][0].weight, sd["features.3.block.0.0.weight"])
    assert model.net.classifier[5].out_features == 4  # the AudioSet head was replaced


def test_weights_of_another_width_are_refused():
    with pytest.raises(AudioclfError, match="the weights are not mn04_as's"):
        AudioMobileNet(3, 0.4, 0.2, pooling="mean").load_pretrained(MobileNet(0.5, dropout=0.0, pooling="mean").state_dict(), "mn04_as")


# -------------------------------------------------------------------------------- the backbone travels with the model

@pytest.fixture(scope="module")
def mn_run(tmp_path_factory) -> Path:
    """A MobileNet checkpoint (random weights, 3 classes) in a run directory."""
    run = tmp_path_factory.mktemp("mn_run")
    config = resolve(overrides={"model": {"backbone": "mn04_as", "pretrained": "none"}, "features": {"duration_s": 1.0}})
    torch.manual_seed(0)
    model = build_network(config.model, 3, config.features.n_mels)
    # BatchNorm statistics of real-looking input and a larger head: fresh ones give the same output for
    # every clip, and exports must be compared on outputs that differ
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(LogMel(config.features)(0.3 * torch.randn(8, config.features.n_samples)))
        model.net.classifier[5].weight.normal_(0, 1.0)
    model.eval()
    save_checkpoint(inference_state(model, config, ["a", "b", "c"]), run / "best.pt")
    return run


def test_predict_rebuilds_the_backbone_and_its_front_end_from_the_file(mn_run):
    model, config, labels = load_model(mn_run)
    assert isinstance(model, AudioMobileNet) and config.model.backbone == "mn04_as" and config.features.n_mels == 128
    clf = load(mn_run, device="cpu")
    probs = clf.predict_proba(tone(440, 44100, 1.0), sample_rate=44100)
    assert probs.shape == (3,) and abs(probs.sum() - 1) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_exports_match_pytorch(mn_run, tmp_path, fmt):
    from audioclf.export import export

    path = export(mn_run, fmt, tmp_path / fmt)
    wave = tone(440, 32000, 1.0) + 0.1 * np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    want = load(mn_run, device="cpu").predict_proba(wave, sample_rate=32000)
    if fmt == "safetensors":
        got = load(path.parent, device="cpu").predict_proba(wave, sample_rate=32000)
    else:
        import onnxruntime as ort

        meta = json.loads((path.parent / "config.json").read_text())
        assert meta["input"] == "waveform"  # the front end is inside the graph
        got = ort.InferenceSession(str(path)).run(None, {"waveform": wave[None]})[0][0]
    assert np.abs(got - want).max() < 1e-4 and want.max() > 0.5


def test_embeddings_of_any_backbone(mn_run, tiny_run, tmp_path):
    for run, dim in ((mn_run, 384), (tiny_run.run_dir, 512)):
        clf = load(run, device="cpu")
        one = clf.embed(tone(440, 16000, 1.0), sample_rate=16000)
        two = clf.embed([tone(440, 16000, 1.0), tone(3000, 16000, 1.0)], sample_rate=16000)
        assert one.shape == (dim,) and two.shape == (2, dim)
        np.testing.assert_allclose(two[0], one, rtol=1e-4, atol=1e-4)  # batch of 2 vs 1: float rounding
        assert not np.allclose(two[0], two[1])


def test_embed_command_writes_npy_and_paths(mn_run, write_wav, tmp_path):
    clips = [write_wav(tone(f, 16000, 1.0), name=f"c{f}.wav") for f in (300, 900)]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    out = tmp_path / "emb.npy"
    r = subprocess.run([sys.executable, "-m", "audioclf", "embed", str(mn_run), *map(str, clips), str(bad),
                        "--out", str(out), "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # a file failed: left out, named, and the exit code says so
    emb = np.load(out)
    assert emb.shape == (2, 384) and np.isfinite(emb).all()
    assert (tmp_path / "emb.paths.txt").read_text().splitlines() == [*map(str, clips)]
    assert "bad.wav" in r.stderr and "1 file(s) failed, left out" in r.stdout


def test_backbones_command_lists_every_backbone_with_its_weight_status():
    r = subprocess.run([sys.executable, "-m", "audioclf", "backbones"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in backbones.BACKBONE_NAMES:
        assert name in r.stdout
    assert "983,599" in r.stdout and "downloadable" in r.stdout


def test_old_checkpoints_with_arch_still_load(tiny_run):
    ckpt = torch.load(tiny_run.run_dir / "best.pt", weights_only=True)
    ckpt["config"]["model"] = {"arch": "resnet18", **{k: v for k, v in ckpt["config"]["model"].items() if k != "backbone"}}
    config = RunConfig.from_saved(ckpt["config"])
    assert config.model.backbone == "resnet18"


def test_random_gain_is_exact_for_the_log_front_end():
    """A gain of g dB in the feature domain equals the waveform scaled by g dB, for the MobileNets' front end."""
    from audioclf.augment import RandomGain

    f = mn04_config().features
    wave = torch.from_numpy(tone(440, 32000, 1.0) + 0.01 * np.random.default_rng(0).standard_normal(32000).astype(np.float32))
    db = float((torch.rand(1, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 12.0)
    gain = RandomGain(12.0, torch.Generator().manual_seed(1), f).train()
    got = gain(LogMel(f)(wave[None]))
    want = LogMel(f)(wave[None] * 10 ** (db / 20))
    assert abs(db) > 1 and torch.allclose(got, want, atol=1e-3)


def test_preemphasis_is_a_first_order_high_pass():
    from audioclf.features import PreEmphasis

    x = torch.tensor([[1.0, 2.0, 4.0, 4.0]])
    assert torch.allclose(PreEmphasis(0.5)(x), torch.tensor([[1.0, 1.5, 3.0, 2.0]]))
    assert PreEmphasis(0.0)(x) is x


def test_missing_weights_fail_before_the_feature_cache_is_built(synth_dir, tmp_path):
    from audioclf.train import fit

    config = resolve(overrides={"model": {"backbone": "mn04_as", "pretrained": "audioset"},
                                "data": {"root": str(synth_dir), "format": "folder", "cache_dir": str(tmp_path / "cache")},
                                "train": {"epochs": 1, "quiet": True}})
    with pytest.raises(AudioclfError, match="cannot download the mn04_as weights"):
        fit(config, tmp_path / "run")
    assert not list((tmp_path / "cache").glob("features-*"))  # nothing was decoded first
