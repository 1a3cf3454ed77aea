"""Live detection (audioclf.stream): the incremental post-processing equals the file's, and a stream of
chunks gives the events detect finds in the same audio."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from test_events import KNOWN, SR, TONES, StridedToneDetector, scene, tone, tone_classifier

from audioclf.errors import AudioclfError
from audioclf.events import DetectConfig, find_events, probability_track, smooth
from audioclf.stream import EventTracker, MedianStream, StreamingDetector, pcm_samples

LABELS = list(TONES)


def closed(messages) -> list[tuple]:
    return [(e["label"], e["onset"], e["offset"], e["score"]) for m in messages for e in m["events"]
            if e["state"] == "close"]


@pytest.mark.parametrize("seed", range(5))
def test_tracker_and_median_stream_equal_find_events_on_random_tracks(seed):
    rng = np.random.default_rng(seed)
    # slowly varying probabilities: runs of every length, gaps around merge_gap_s
    track = np.clip(np.cumsum(rng.normal(0, 0.12, (400, 3)), axis=0) % 1.6 - 0.3, 0, 1).astype(np.float32)
    config = DetectConfig(hop_s=0.1, median_s=[0.0, 0.3, 0.5, 0.7, 1.1][seed], onset_threshold=0.6,
                          offset_threshold=0.35, min_duration_s=0.3, merge_gap_s=0.2 * seed)
    labels = ["a", "b", "c"]
    expected = find_events(track, labels, config, filename="x", duration_s=39.95, ignore=["c"])
    median, tracker, messages, i = MedianStream(config), EventTracker(labels, config, ignore=["c"]), [], 0
    smoothed = []
    while i < len(track):  # chunks of 1-8 cells
        n = int(rng.integers(1, 9))
        chunk, i = track[i:i + n], i + n
        out = median.push(chunk, last=i >= len(track))
        smoothed.append(out)
        messages.append({"events": tracker.push(out)})
    messages.append({"events": tracker.finish(39.95)})
    np.testing.assert_array_equal(np.concatenate(smoothed), smooth(track, config))
    assert closed(messages) and sorted(closed(messages), key=lambda e: (e[1], e[0])) == \
        [(e.event_label, e.onset, e.offset, e.score) for e in expected]
    opened = [e for m in messages for e in m["events"] if e["state"] == "open"]
    assert len(opened) == len(expected) and all(e["offset"] is None for e in opened)


@pytest.mark.parametrize("source", ["frames", "windows"])
@pytest.mark.parametrize("rate", [SR, 44100])
def test_streamed_chunks_give_detects_events_within_one_hop(tmp_path, source, rate):
    path = tmp_path / "scene.wav"
    scene(path, KNOWN[:3], 10.0)
    config = DetectConfig(source=source, median_s=0.3, min_duration_s=0.2, merge_gap_s=0.2)
    clf = tone_classifier()
    duration_s, track = probability_track(clf, str(path), config)
    expected = find_events(track, LABELS, config, filename="scene.wav", duration_s=duration_s)
    wave, _ = sf.read(path, dtype="float32")
    if rate != SR:
        import soxr

        wave = soxr.resample(wave, SR, rate)
    hop_s = 0.5
    detector = StreamingDetector(clf, config, sample_rate=rate, hop_s=hop_s, top_k=2)
    messages, rng, i = [], np.random.default_rng(0), 0
    while i < len(wave):  # chunks of 10-300 ms, as a browser or sound card sends them
        n = int(rng.integers(rate // 100, rate * 3 // 10))
        detector.feed(wave[i:i + n])
        messages += list(detector.steps())
        i += n
    messages += list(detector.steps(last=True))
    got = closed(messages)
    assert [g[0] for g in got] == [e.event_label for e in expected]
    for g, e in zip(got, expected):
        assert abs(g[1] - e.onset) <= hop_s and abs(g[2] - e.offset) <= hop_s, (g, e)
    assert messages[-1]["time_s"] == pytest.approx(duration_s, abs=1e-3)
    assert len(messages) - int(np.ceil(duration_s / hop_s)) in (0, 1)  # + the end, when it falls on a hop
    assert all(len(m["top"]) == 2 for m in messages)
    # while the low tone sounds (1-3 s) it leads the bars
    assert messages[3]["top"][0]["label"] == "low"


@pytest.mark.parametrize("source", ["frames", "windows"])
@pytest.mark.parametrize("hop_s", [0.5, 0.25])
@pytest.mark.parametrize("seconds", [6.0, 1.5])  # 1.5: a recording that ends before it fills a frames window
def test_a_stream_that_starts_with_a_sound_gives_detects_first_event(source, hop_s, seconds):
    # a network that averages its steps, as the real ones do: zeros after the audio received so far would
    # dilute the first window's tone, where a file's first window is all tone
    clf = tone_classifier(StridedToneDetector())
    config = DetectConfig(source=source, median_s=0.3, min_duration_s=0.2, merge_gap_s=0.2)
    wave = np.zeros(int(seconds * SR), np.float32)
    wave[:int(min(seconds, 3.0) * SR)] = tone(TONES["low"], min(seconds, 3.0))
    duration_s, track = probability_track(clf, wave, config)
    expected = find_events(track, LABELS, config, filename="x", duration_s=duration_s)
    detector = StreamingDetector(clf, config, sample_rate=SR, hop_s=hop_s)
    messages = []
    for i in range(0, len(wave), SR // 10):
        detector.feed(wave[i:i + SR // 10])
        messages += list(detector.steps())
    got = closed(messages + list(detector.steps(last=True)))
    assert [g[:2] for g in got] == [(e.event_label, e.onset) for e in expected] == [("low", 0.0)]
    assert abs(got[0][2] - expected[0].offset) <= hop_s


def test_a_hop_too_short_for_one_stft_frame_is_refused():
    with pytest.raises(AudioclfError, match="hop_s=0.01 is too short"):
        StreamingDetector(tone_classifier(), DetectConfig(), sample_rate=SR, hop_s=0.01)


def test_events_open_soon_after_the_sound_starts():
    config = DetectConfig(median_s=0.3, min_duration_s=0.2, merge_gap_s=0.2)
    detector = StreamingDetector(tone_classifier(), config, sample_rate=SR, hop_s=0.25)
    wave = np.zeros(6 * SR, np.float32)
    wave[int(3.0 * SR):] = 0.3 * np.sin(2 * np.pi * TONES["high"] * np.arange(3 * SR) / SR)
    seen = None
    for i in range(0, len(wave), SR // 10):
        detector.feed(wave[i:i + SR // 10])
        for m in detector.steps():
            if seen is None and any(e["state"] == "open" for e in m["events"]):
                seen = m["time_s"]
    assert seen is not None and 3.0 < seen <= 3.75  # onset + median/2 + minimum duration, a hop at most later


def test_pcm_chunks_are_read_or_refused_with_the_reason():
    assert pcm_samples(np.array([16384, -32768], "<i2").tobytes(), "int16").tolist() == [0.5, -1.0]
    assert pcm_samples(np.array([0.25], "<f4").tobytes(), "float32").tolist() == [0.25]
    with pytest.raises(AudioclfError, match="not a whole number of float32 samples"):
        pcm_samples(b"\0\0\0", "float32")
    detector = StreamingDetector(tone_classifier(), DetectConfig(), sample_rate=SR)
    with pytest.raises(AudioclfError, match="NaN or infinite"):
        detector.feed(np.array([np.nan], np.float32))
