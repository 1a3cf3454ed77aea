"""Aligned fingerprints: a clip matches its own altered copies at the right offset, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from audioclf.audio import resample
from audioclf.fingerprint import aligned_match, fingerprint

SR = 22050


def noisy_events(seed: int, seconds: float = 4.0) -> np.ndarray:
    """Noise bursts with random spectra at random times: a clip with fine structure of its own."""
    rng = np.random.default_rng(seed)
    y = 0.02 * rng.standard_normal(int(SR * seconds))
    for _ in range(12):
        start, n = int(rng.integers(0, len(y) - SR // 4)), int(rng.integers(SR // 20, SR // 4))
        y[start:start + n] += rng.uniform(0.1, 0.4) * np.convolve(rng.standard_normal(n), rng.standard_normal(16), "same")
    return (y / np.abs(y).max() * 0.8).astype(np.float32)


@pytest.fixture
def prints(tmp_path):
    y = noisy_events(0)

    def fp(wave, sr=SR, name="x.wav", **kw):
        path = tmp_path / name
        sf.write(path, wave, sr, **kw)
        return fingerprint(path)

    return y, fp


def test_altered_copies_match_at_their_offset(prints):
    y, fp = prints
    original = fp(y, name="a.wav")
    trimmed, offset = aligned_match(original, fp(y[SR // 2:], name="trim.wav"))
    assert trimmed > 0.95 and offset == pytest.approx(0.5, abs=0.02)
    assert aligned_match(original, fp(y * 0.25, name="gain.wav"))[0] > 0.95
    assert aligned_match(original, fp(resample(y, SR, 16000), 16000, name="rs.wav"))[0] > 0.9
    assert aligned_match(original, fp(y, name="lossy.ogg", format="OGG", subtype="VORBIS"))[0] > 0.9
    # the other way round the offset is negative: the original starts 0.5 s before the copy
    assert aligned_match(fp(y[SR // 2:], name="trim.wav"), original)[1] == pytest.approx(-0.5, abs=0.02)


def test_other_clips_and_shared_padding_do_not_match(prints):
    y, fp = prints
    other = noisy_events(1)
    assert aligned_match(fp(y, name="a.wav"), fp(other, name="b.wav"))[0] < 0.3
    pad = np.zeros(3 * SR, np.float32)  # two different clips, padded alike with digital silence
    match, _ = aligned_match(fp(np.concatenate([y[:SR], pad]), name="c.wav"),
                             fp(np.concatenate([other[:SR], pad]), name="d.wav"))
    assert match < 0.3


def test_silence_and_too_short_overlaps_match_nothing(prints):
    y, fp = prints
    silent = fp(np.zeros(SR, np.float32), name="s.wav")
    assert not silent.any() and aligned_match(silent, fp(y, name="a.wav")) == (0.0, 0.0)
    assert aligned_match(np.ones((4, 10)), np.ones((4, 0))) == (0.0, 0.0)


def test_two_steady_tones_do_not_match_by_their_edges(prints):
    _, fp = prints
    t = np.arange(2 * SR) / SR
    a, b = (0.5 * np.sin(2 * np.pi * f * t).astype(np.float32) for f in (440.0, 620.0))
    assert aligned_match(fp(a, name="a.wav"), fp(b, name="b.wav"))[0] < 0.3
