import librosa
import numpy as np
import pytest
import torch

from audioclf.audio import load_audio
from audioclf.config import AudioclfError, FeatureConfig
from audioclf.features import LogMel, Normalize, Spectrogram
from conftest import chirp_noise

SR = 22050


def librosa_logmel(y: np.ndarray, c: FeatureConfig) -> np.ndarray:
    if c.peak_normalize:
        y = y / max(np.abs(y).max(), 1e-3)
    return np.log1p(librosa.feature.melspectrogram(y=y, sr=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length,
                                                   win_length=c.win_length, n_mels=c.n_mels, fmin=c.f_min,
                                                   fmax=c.f_max))


def assert_parity(y: np.ndarray, config: FeatureConfig):
    ours = LogMel(config)(torch.from_numpy(y)).numpy()
    ref = librosa_logmel(y, config)
    assert ours.shape == ref.shape == (config.n_mels, 1 + y.size // config.hop_length)
    assert ref.max() > 1.0  # the signal is loud enough for the comparison to mean something
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------- librosa parity

def test_logmel_matches_librosa_on_chirp_and_noise():
    assert_parity(chirp_noise(SR, 2.3), FeatureConfig())


def test_logmel_matches_librosa_with_other_settings():
    c = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=160, win_length=400, n_mels=64,
                      f_min=50.0, f_max=7000.0, peak_normalize=False)
    assert_parity(chirp_noise(16000, 1.1, seed=3), c)


def test_peak_normalisation_makes_features_level_invariant():
    y = torch.from_numpy(chirp_noise(SR, 1.0))
    on, off = LogMel(FeatureConfig()), LogMel(FeatureConfig(peak_normalize=False))
    quiet = y * 0.01  # 40 dB down, like FSDD's quietest speaker against its loudest
    torch.testing.assert_close(on(quiet), on(y), rtol=1e-4, atol=1e-5)
    assert (off(quiet) - off(y)).abs().max() > 1.0  # without it the level changes the input a lot
    batch = torch.stack([y, quiet, torch.zeros_like(y)])
    out = on(batch)  # each row on its own: a silent row stays silent, not blown up
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)
    assert out[2].abs().max() == 0
    hiss = torch.randn(SR, generator=torch.Generator().manual_seed(0)) * 1e-5  # -100 dB: boosted by 60 dB at most
    assert on(hiss).max() < on(y).max() / 10


@pytest.mark.shared_data
def test_logmel_matches_librosa_on_esc50_clip(esc50_root):
    y = load_audio(esc50_root / "audio" / "1-100032-A-0.flac", SR)  # dog bark
    assert y.size == 5 * SR
    assert_parity(y, FeatureConfig())


def test_batched_equals_one_by_one():
    logmel = LogMel()
    waves = torch.from_numpy(np.stack([chirp_noise(SR, 1.0, seed=s) for s in range(3)]))  # (B, T)
    batched = logmel(waves)
    assert batched.shape == (3, 80, 1 + SR // 256)
    for wave, out in zip(waves, batched):
        torch.testing.assert_close(out, logmel(wave), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # rows really differ


def test_any_leading_shape():
    waves = torch.from_numpy(np.stack([chirp_noise(SR, 0.5, seed=s) for s in range(6)])).reshape(2, 3, -1)
    out = LogMel()(waves)
    assert out.shape == (2, 3, 80, 1 + waves.shape[-1] // 256)
    torch.testing.assert_close(out[1, 2], LogMel()(waves[1, 2]), rtol=1e-5, atol=1e-6)


def test_silence_gives_zeros():
    assert torch.equal(LogMel()(torch.zeros(2, 4096)), torch.zeros(2, 80, 17))


def test_spectrogram_refuses_window_longer_than_fft():
    with pytest.raises(AudioclfError, match="win_length=2048"):
        Spectrogram(n_fft=1024, hop_length=256, win_length=2048, periodic=True)


def test_fixed_tensors_are_buffers():
    names = {n for n, _ in LogMel().named_buffers()}
    assert names == {"spectrogram.window", "mel.fb"}
    assert list(LogMel().parameters()) == []


# ---------------------------------------------------------------------------------------- normalisation

def _clips(seed=0, n_mels=8):
    g = torch.Generator().manual_seed(seed)
    # Different lengths and a per-band offset and scale, so per-band and global statistics differ.
    scale = torch.linspace(0.5, 3.0, n_mels).unsqueeze(1)
    offset = torch.arange(n_mels, dtype=torch.float32).unsqueeze(1)
    return [torch.randn(n_mels, n, generator=g) * scale + offset for n in (5, 17, 40)]


def test_normalize_fit_per_band_matches_numpy():
    clips = _clips()
    all_frames = np.concatenate([c.numpy() for c in clips], axis=1).astype(np.float64)
    norm = Normalize(8).fit(iter(clips))  # any iterable, consumed once
    assert norm.mean.shape == norm.std.shape == (8, 1)
    np.testing.assert_allclose(norm.mean[:, 0].numpy(), all_frames.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.std[:, 0].numpy(), all_frames.std(axis=1), rtol=1e-5)
    z = torch.cat([norm(c) for c in clips], dim=1)
    torch.testing.assert_close(z.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(8), atol=1e-5, rtol=0)


def test_normalize_fit_global_matches_numpy():
    clips = _clips()
    all_frames = np.concatenate([c.numpy() for c in clips], axis=1).astype(np.float64)
    norm = Normalize(8).fit(clips, per_band=False)
    np.testing.assert_allclose(norm.mean.numpy(), np.full((8, 1), all_frames.mean()), rtol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), np.full((8, 1), all_frames.std()), rtol=1e-5)


def test_normalize_constant_band_does_not_divide_by_zero():
    norm = Normalize(2).fit([torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 4.0]])])
    assert norm.std[0, 0] > 0
    assert torch.isfinite(norm(torch.ones(2, 3))).all()


def test_normalize_refuses_zero_frames():
    with pytest.raises(AudioclfError, match="zero frames"):
        Normalize(8).fit([])


def test_normalize_statistics_are_saved():
    norm = Normalize(8).fit(_clips())
    fresh = Normalize(8)
    fresh.load_state_dict(norm.state_dict())
    assert torch.equal(fresh.mean, norm.mean) and torch.equal(fresh.std, norm.std)


@pytest.mark.parametrize("sr,n_fft,n_mels,f_min,f_max", [(22050, 1024, 80, 0.0, None), (8000, 1024, 80, 0.0, None),
                                                          (16000, 512, 64, 50.0, 7000.0), (44100, 2048, 128, 20.0, None)])
def test_mel_filterbank_equals_librosa(sr, n_fft, n_mels, f_min, f_max):
    import librosa

    from audioclf.features import mel_filterbank

    ours = mel_filterbank(sr, n_fft, n_mels, f_min, f_max)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_inference_front_end_does_not_import_librosa():
    import subprocess
    import sys

    code = "import sys, torch; from audioclf.features import LogMel; LogMel()(torch.zeros(1, 4096)); print('librosa' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
