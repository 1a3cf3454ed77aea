"""Sound event detection: tracks, post-processing, tuning and the detect command, on synthetic tones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from _models import tiny_run  # noqa: F401  (fixture)
from audioclf.checkpoint import load_checkpoint
from audioclf.cli import main
from audioclf.config import AudioclfError, FeatureConfig, RunConfig, TrainConfig
from audioclf.events import (DetectConfig, Event, find_events, probability_track, read_events, track_from_rows,
                             write_events)
from audioclf.features import LogMel
from audioclf.predict import Classifier

SR = 16000
FEATURES = FeatureConfig(sample_rate=SR, duration_s=2.0, n_mels=40, n_fft=512, win_length=512, hop_length=160,
                         peak_normalize=False)
TONES = {"low": 500.0, "high": 2500.0}


def tone(freq: float, seconds: float) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR).astype(np.float32)


class ToneDetector(nn.Module):
    """A network whose output is known: the log-mel level of each tone's band, at every spectrogram frame."""

    def __init__(self):
        super().__init__()
        logmel = LogMel(FEATURES)
        mels = [logmel(torch.from_numpy(tone(f, 1.0))[None])[0].mean(-1) for f in TONES.values()]
        self.bands = [int(m.argmax()) for m in mels]
        silence = float(logmel(torch.zeros(1, SR)).mean())
        loud = torch.stack([m.max() for m in mels])
        # logit -10 in silence, +10 at each tone's level: a half-covered window averages to 0.5
        self.level = nn.Parameter((silence + loud) / 2, requires_grad=False)  # a parameter: serve asks its device
        self.scale = 20.0 / (loud - silence)

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) -> (batch, frames, 2)."""
        return (torch.stack([x[:, b] for b in self.bands], -1) - self.level) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frame_logits(x).mean(1)


class StridedToneDetector(ToneDetector):
    """ToneDetector with the time resolution of the real networks: one step per 32 spectrogram frames."""

    def frame_logits(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool1d(super().frame_logits(x).transpose(1, 2), 32, 32, ceil_mode=True).transpose(1, 2)


def tone_classifier(net=None) -> Classifier:
    config = RunConfig(features=FEATURES, train=TrainConfig(task="multilabel"))
    return Classifier(net or ToneDetector(), config, list(TONES), device="cpu")


def scene(path, events, seconds: float) -> None:
    """A recording of ``seconds`` of silence with tones at ``events`` ((label, onset, offset) in s)."""
    wave = np.zeros(int(seconds * SR), np.float32)
    for label, onset, offset in events:
        wave[int(onset * SR):int(onset * SR) + int((offset - onset) * SR)] += tone(TONES[label], offset - onset)
    sf.write(path, wave, SR)


# 70 s: longer than two 30-s decoding blocks, so the tracks cross block boundaries; two tones overlap
KNOWN = [("low", 1.0, 3.0), ("high", 2.5, 6.0), ("low", 7.3, 8.1), ("high", 45.05, 47.5), ("low", 61.2, 61.9)]


@pytest.mark.parametrize("source", ["frames", "windows"])
def test_detect_finds_known_tones_within_a_tenth_of_a_second(tmp_path, source):
    path = tmp_path / "scene.wav"
    scene(path, KNOWN, 70.0)
    config = DetectConfig(source=source, median_s=0.3, min_duration_s=0.2, merge_gap_s=0.2)
    duration_s, track = probability_track(tone_classifier(), str(path), config)
    assert duration_s == pytest.approx(70.0) and track.shape == (700, 2)
    events = find_events(track, list(TONES), config, filename="scene.wav", duration_s=duration_s)
    assert [e.event_label for e in events] == [label for label, *_ in KNOWN]
    for e, (label, onset, offset) in zip(events, KNOWN):
        assert abs(e.onset - onset) <= 0.1 + 1e-9 and abs(e.offset - offset) <= 0.1 + 1e-9, (e, onset, offset)
        assert 0.5 <= e.score <= 1.0


def test_frame_steps_are_placed_on_the_frames_they_cover(tmp_path):
    # 10-s blocks every 9 s; a step covers 32 frames (0.32 s). The tone starts and ends on step boundaries of
    # the second block, late in it, where spreading 32 steps evenly over 10 s put them 0.2 s early.
    onset, offset = 9 + 0.32 * 27, 9 + 0.32 * 29
    scene(tmp_path / "s.wav", [("low", onset, offset)], 30.0)
    config = DetectConfig(block_s=10.0, median_s=0.0, onset_threshold=0.5, offset_threshold=0.5, min_duration_s=0.0,
                          merge_gap_s=0.0)
    duration_s, track = probability_track(tone_classifier(StridedToneDetector()), str(tmp_path / "s.wav"), config)
    (event,) = find_events(track, list(TONES), config, filename="s.wav", duration_s=duration_s)
    assert event.onset == pytest.approx(onset, abs=0.06) and event.offset == pytest.approx(offset, abs=0.06)


def test_frame_blocks_cover_the_file_with_a_quarter_training_length_of_context():
    from audioclf.events import frame_blocks

    assert frame_blocks(np.zeros(70 * SR), FEATURES, 10.0) == (10.0, 9.0)  # FEATURES trains on 2 s
    assert frame_blocks(np.zeros(7 * SR), FEATURES, 10.0) == (7.0, 6.0)  # one block, no padding
    assert frame_blocks(np.zeros(SR), FEATURES, 10.0) == (2.0, 1.0)  # never shorter than the training length


def test_ignore_leaves_a_class_out_and_refuses_unknown_names(tmp_path):
    config = DetectConfig()
    track = np.zeros((100, 2), np.float32)
    track[10:40] = 0.9
    events = find_events(track, ["rain", "dog"], config, filename="f", duration_s=10.0, ignore=["rain"])
    assert [(e.event_label, e.onset, e.offset) for e in events] == [("dog", 1.0, 4.0)]
    from audioclf.events import check_ignore

    with pytest.raises(AudioclfError, match="wind.*not among the model's classes"):
        check_ignore(["wind"], ["rain", "dog"])


def test_post_processing_hysteresis_gap_merge_and_minimum_duration():
    config = DetectConfig(hop_s=0.1, median_s=0.0, onset_threshold=0.6, offset_threshold=0.3, min_duration_s=0.5,
                          merge_gap_s=0.3)
    p = np.zeros(100, np.float32)
    p[10:30] = 0.4  # above the offset threshold only ...
    p[15] = 0.7  # ... but it reaches the onset threshold once: one event 1.0-3.0
    p[32:40] = 0.7  # 0.2 s after it: merged into 1.0-4.0
    p[50:60] = 0.5  # never reaches onset: nothing
    p[70:73] = 0.9  # 0.3 s: shorter than min_duration
    p[80:95] = 0.8
    events = find_events(p[:, None], ["x"], config, filename="f", duration_s=9.7)
    assert [(e.onset, e.offset) for e in events] == [(1.0, 4.0), (8.0, 9.5)]
    assert events[0].score == pytest.approx(0.7)
    with pytest.raises(AudioclfError, match="offset_threshold=0.7 is above onset_threshold=0.5"):
        DetectConfig(onset_threshold=0.5, offset_threshold=0.7)


def test_track_from_rows_takes_each_time_from_the_nearest_window_centre():
    # two 2-s windows at 0 and 1 s, 4 steps each: their cells meet at 1.5 s
    rows = [np.full((4, 1), 0.0), np.full((4, 1), 1.0)]
    track = track_from_rows([0, SR], rows, 2.0, SR, 3.0, 0.5)
    assert track[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_event_lists_round_trip_and_bad_rows_name_the_file(tmp_path):
    events = [Event("a.wav", 0.5, 1.25, "dog", 0.9), Event("b.wav", 2.0, 3.0, "rain", 0.61)]
    write_events(events, tmp_path / "ev.tsv")
    assert read_events(tmp_path / "ev.tsv") == events
    (tmp_path / "bad.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t2.0\t1.0\tdog\n")
    with pytest.raises(AudioclfError, match=r"bad.tsv: row 1 .*onset <= offset"):
        read_events(tmp_path / "bad.tsv")


@pytest.mark.slow
def test_detect_tune_and_evaluate_events_end_to_end(tmp_path, tiny_run, capsys):  # noqa: F811
    """The commands a user runs: tune on validation scenes (saved with the run), detect, evaluate."""
    from audioclf.audio import load_audio

    sr = 16000
    clips = {label: load_audio(next((tiny_run.data_dir / label).glob("*.wav")), sr) for label in tiny_run.labels}
    val, test = tmp_path / "val", tmp_path / "test"
    reference = {val: [], test: []}
    for folder, n in ((val, 3), (test, 2)):
        folder.mkdir()
        for i in range(n):
            wave, t = np.zeros(int(8 * sr), np.float32), 0.5 + 0.3 * i
            for label in tiny_run.labels:
                wave[int(t * sr):int(t * sr) + len(clips[label])] += clips[label]
                reference[folder].append(Event(f"s{i}.wav", round(t, 3), round(t + len(clips[label]) / sr, 3), label, 1.0))
                t += 2.5
            sf.write(folder / f"s{i}.wav", wave, sr)
        write_events(reference[folder], folder / "events.tsv")
    run = tiny_run.run_dir
    assert main(["detect", str(run), "--tune", str(val), str(val / "events.tsv"), "--quiet"]) == 0
    saved = json.loads((run / "detect.json").read_text())
    assert load_checkpoint(run)["detect"] == saved and set(saved) >= {"onset_threshold", "median_s"}
    assert main(["detect", str(run), str(test), "--out", str(tmp_path / "ev.tsv"), "--plot", str(tmp_path / "plots"),
                 "--quiet"]) == 0
    found = read_events(tmp_path / "ev.tsv")
    assert found and {e.filename for e in found} <= {"s0.wav", "s1.wav"}
    assert (tmp_path / "plots" / "s0.png").stat().st_size > 10_000
    assert main(["evaluate-events", str(test / "events.tsv"), str(tmp_path / "ev.tsv"), "--out",
                 str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_reference"] == 6 and 0.0 <= metrics["event_f1"] <= 1.0
    assert "event-based" in capsys.readouterr().out
    # a detect flag wins over the saved settings
    assert main(["detect", str(run), str(test), "--out", str(tmp_path / "none.tsv"), "--onset-threshold", "1.0",
                 "--offset-threshold", "1.0", "--quiet"]) == 0
    assert read_events(tmp_path / "none.tsv") == []


def test_a_model_without_tuned_settings_gets_its_tasks_defaults(tmp_path, monkeypatch):
    from audioclf import events

    run = tmp_path / "run"
    run.mkdir()
    (run / "detect.json").write_text(json.dumps({"onset_threshold": 0.7}))
    assert events.model_settings(run, "multilabel") == {"onset_threshold": 0.7}  # tuned settings win
    monkeypatch.setattr(events, "saved_config", lambda model: None)
    tagger = DetectConfig.from_dict(events.model_settings(run, "multilabel"))
    assert (tagger.onset_threshold, tagger.offset_threshold, tagger.median_s) == (0.4, 0.4, 0.0)
    assert events.model_settings(run, "multiclass") == {}  # DetectConfig's own defaults
    assert events.model_settings("mn04_as", "multilabel") == {}  # the AudioSet head was not tuned as a tagger


def test_detect_needs_out_with_inputs(tmp_path, capsys):
    assert main(["detect", "mn04_as", str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_serve_detect_returns_the_events_of_an_upload(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from audioclf.serve import create_app

    scene(tmp_path / "s.wav", KNOWN[:3], 10.0)
    with TestClient(create_app(tone_classifier())) as client:
        r = client.post("/detect", files={"file": ("s.wav", (tmp_path / "s.wav").read_bytes())})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["duration_s"] == pytest.approx(10.0)
        assert [e["label"] for e in body["events"]] == [label for label, *_ in KNOWN[:3]]
        assert [e["onset"] for e in body["events"]] == pytest.approx([onset for _, onset, _ in KNOWN[:3]], abs=0.1 + 1e-9)
        r = client.post("/detect?ignore=low", files={"file": ("s.wav", (tmp_path / "s.wav").read_bytes())})
        assert [e["label"] for e in r.json()["events"]] == ["high"]
        r = client.post("/detect?ignore=rain", files={"file": ("s.wav", (tmp_path / "s.wav").read_bytes())})
        assert r.status_code == 422 and "rain" in r.json()["detail"]
        assert 'fetch("detect"' in client.get("/").text


def test_tuning_a_backbone_name_asks_where_to_save(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("audioclf.commands.detect.load_detector", lambda model, **kw: tone_classifier())
    assert main(["detect", "mn04_as", "--tune", str(tmp_path), str(tmp_path / "ev.tsv")]) == 2
    assert "--params detect.json" in capsys.readouterr().err
