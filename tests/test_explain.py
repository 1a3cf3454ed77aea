"""Explanations: the occlusion map finds the evidence where it is, and the command draws it."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from _models import FEATURES, train_tiny

from audioclf.cli import main
from audioclf.explain import explain, occlusion_map
from audioclf.features import LogMel

SR = FEATURES.sample_rate
TONE_HZ, TONE_S = 3000.0, (0.55, 0.75)  # where the class lives: a 3 kHz tone from 0.55 to 0.75 s


def clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One second of white noise with a tone burst: for ``tone`` the class's, for ``other`` a 1 kHz one at a
    random time (as loud, so that the level of the noise after peak normalisation tells nothing)."""
    t = np.arange(SR) / SR
    if kind == "tone":
        freq, (start, end) = TONE_HZ, TONE_S
    else:
        freq, start = 1000.0, rng.uniform(0, 0.8)
        end = start + 0.2
    on = (t >= start) & (t < end)
    y = 0.05 * rng.standard_normal(SR)
    y[on] += 0.5 * np.sin(2 * np.pi * freq * t[on])
    return y.astype(np.float32)


@pytest.fixture(scope="module")
def tone_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    for kind in ("other", "tone"):
        (root / "data" / kind).mkdir(parents=True)
        for i in range(12):
            sf.write(root / "data" / kind / f"{i}.wav", clip(kind, rng), SR)
    sf.write(root / "probe.wav", clip("tone", np.random.default_rng(99)), SR)
    return train_tiny(root / "run", root / "data", steps=40), root / "probe.wav"


def test_the_maps_maximum_lies_on_the_tone(tone_model):
    model, probe = tone_model
    r = explain(model, probe, device="cpu")
    assert r["label"] == "tone" and r["score"] > 0.9
    assert r["map"].shape == r["features"].shape == (FEATURES.n_mels, FEATURES.n_frames)
    band, frame = np.unravel_index(r["map"].argmax(), r["map"].shape)
    tone_band = int(np.argmin(np.abs(r["band_hz"] - TONE_HZ)))
    assert abs(band - tone_band) <= 1, (band, tone_band, r["band_hz"][band])
    hop_s = FEATURES.hop_length / SR
    assert TONE_S[0] - hop_s <= frame * hop_s <= TONE_S[1] + hop_s, frame * hop_s
    # and away from the tone the map is small: the evidence is where the tone is
    off = np.ones_like(r["map"], dtype=bool)
    off[max(0, tone_band - 2):tone_band + 3] = False
    assert r["map"][off].max() < 0.5 * r["map"].max()


def test_occlusion_of_a_region_the_model_ignores_scores_zero():
    """A model that reads only band 3: every patch away from band 3 changes nothing."""
    class BandReader(torch.nn.Module):
        def forward(self, x):  # (batch, n_mels, frames) -> (batch, 2)
            s = x[:, 3].mean(dim=1)
            return torch.stack([s, -s], dim=1)

    x = torch.zeros(16, 40)
    x[3, 10:20] = 5.0
    heat, score = occlusion_map(BandReader(), x, 0, patch=(2, 4))
    assert score > 0.9 and heat[3, 10:20].min() > 0
    assert np.allclose(heat[6:], 0) and np.allclose(heat[:, 30:], 0)


def test_explain_command_writes_the_png_and_refuses_bad_outs(tone_model, tmp_path, capsys):
    model, probe = tone_model
    out = tmp_path / "x.png"
    assert main(["explain", str(model), str(probe), "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.startswith("tone ")
    assert main(["explain", str(model), str(probe), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "name a .png file" in capsys.readouterr().err
    assert main(["explain", str(model), str(probe), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", str(model), str(probe), "--out", str(out), "--label", "cat"]) == 2
    assert "not one of the model's classes: other, tone" in capsys.readouterr().err


def test_a_long_recording_is_explained_in_the_window_where_the_class_is(tone_model, tmp_path):
    model, _ = tone_model
    rng = np.random.default_rng(5)
    long = np.concatenate([clip("other", rng), clip("other", rng), clip("tone", rng)])  # the tone in the 3rd second
    sf.write(tmp_path / "long.wav", long, SR)
    r = explain(model, tmp_path / "long.wav", label="tone", device="cpu")
    assert r["start_s"] + TONE_S[1] > 2.0 and r["start_s"] <= 2.0 + TONE_S[0]
    assert r["window_s"] == FEATURES.duration_s


def test_log_mel_features_match_what_the_map_is_drawn_over(tone_model):
    model, probe = tone_model
    r = explain(model, probe, device="cpu")
    wave = torch.from_numpy(sf.read(probe, dtype="float32")[0])
    assert np.allclose(r["features"], LogMel(FEATURES)(wave).numpy(), atol=1e-5)


def test_the_server_draws_it_on_request(tone_model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from audioclf.predict import load
    from audioclf.serve import create_app

    model, probe = tone_model
    with TestClient(create_app(load(model, "cpu"))) as client:
        sent = {"file": ("probe.wav", probe.read_bytes(), "audio/wav")}
        r = client.post("/explain", files=sent)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.post("/explain", params={"label": "other"}, files=sent).status_code == 200
        r = client.post("/explain", params={"label": "cat"}, files=sent)
        assert r.status_code == 422 and "not one of the model's classes" in r.json()["detail"]
        assert client.post("/explain").status_code == 400
        assert client.post("/explain", files={"file": ("x.wav", b"junk", "audio/wav")}).status_code == 415
        assert 'id="explain-button"' in client.get("/").text
