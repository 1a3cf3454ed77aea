"""The /listen WebSocket of audioclf serve: streamed chunks give detect's events, and its limits hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_events import KNOWN, SR, TONES, scene, tone_classifier

from audioclf.events import DetectConfig, find_events, probability_track

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from audioclf.serve import create_app  # noqa: E402

FAST = {"max_listen_speed": 1000.0}  # the tests stream faster than real time


def client(**limits) -> TestClient:
    return TestClient(create_app(tone_classifier(), device="cpu", **limits))


def chunks(wave: np.ndarray, rate: int, seconds: float = 0.2):
    step = int(rate * seconds)
    return [wave[i:i + step] for i in range(0, len(wave), step)]


def refusal(ws) -> tuple[dict, int, str]:
    """The error message and the close frame that follow a refusal."""
    error = ws.receive_json()
    with pytest.raises(WebSocketDisconnect) as e:
        ws.receive_json()
    return error, e.value.code, e.value.reason


def test_streamed_chunks_give_the_events_of_detect_on_the_file(tmp_path):
    path = tmp_path / "scene.wav"
    scene(path, KNOWN[:3], 10.0)
    config = DetectConfig()  # a Classifier carries no saved settings: the server uses the defaults
    duration_s, track = probability_track(tone_classifier(), str(path), config)
    expected = find_events(track, list(TONES), config, filename="scene.wav", duration_s=duration_s)
    import soundfile as sf

    wave = sf.read(path, dtype="float32")[0]
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    with client(**FAST).websocket_connect("/listen") as ws:
        ws.send_text(json.dumps({"sample_rate": SR, "dtype": "int16", "top_k": 2}))
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["hop_s"] == 0.5 and ready["sample_rate"] == SR
        messages = []
        for chunk in chunks(pcm, SR):
            ws.send_bytes(chunk.tobytes())  # the answers queue up; read after the stop
        ws.send_text(json.dumps({"type": "stop"}))
        while (m := ws.receive_json())["type"] != "end":
            messages.append(m)
        assert m["time_s"] == pytest.approx(10.0)
    # an event closes once the merge gap has passed without its class, so closes come out of onset order
    closed = sorted((e for m in messages for e in m["events"] if e["state"] == "close"), key=lambda e: e["onset"])
    assert [e["label"] for e in closed] == [e.event_label for e in expected]
    for got, e in zip(closed, expected):
        assert abs(got["onset"] - e.onset) <= 0.5 and abs(got["offset"] - e.offset) <= 0.5
    opened = [e for m in messages for e in m["events"] if e["state"] == "open"]
    assert [e["label"] for e in opened] == [e.event_label for e in expected]
    assert all(m["type"] == "hop" and len(m["top"]) == 2 for m in messages)


def test_too_many_listeners_are_turned_away_with_the_reason():
    c = client(max_listeners=1, **FAST)
    with c.websocket_connect("/listen") as first:
        first.send_text(json.dumps({"sample_rate": SR}))
        assert first.receive_json()["type"] == "ready"
        with c.websocket_connect("/listen") as second:
            error, code, reason = refusal(second)
            assert code == 1013 and "--max-listeners" in reason and "limit is 1" in error["detail"]
    with c.websocket_connect("/listen") as third:  # the first one has gone: room again
        third.send_text(json.dumps({"sample_rate": SR}))
        assert third.receive_json()["type"] == "ready"


def test_an_oversized_chunk_closes_the_stream():
    with client(max_chunk_s=0.5, **FAST).websocket_connect("/listen") as ws:
        ws.send_text(json.dumps({"sample_rate": SR, "dtype": "float32"}))
        ws.receive_json()
        ws.send_bytes(np.zeros(SR, "<f4").tobytes())  # 1 s
        error, code, reason = refusal(ws)
        assert code == 1009 and "--max-chunk-s" in reason and "64000 bytes" in error["detail"]


def test_a_silent_client_is_closed_after_the_idle_timeout():
    with client(listen_idle_s=0.3).websocket_connect("/listen") as ws:
        error, code, reason = refusal(ws)  # not even the first message
        assert code == 1008 and "nothing arrived for 0.3 s" in error["detail"]
    with client(listen_idle_s=0.3).websocket_connect("/listen") as ws:
        ws.send_text(json.dumps({"sample_rate": SR}))
        ws.receive_json()
        ws.send_bytes(np.zeros(SR // 10, "<f4").tobytes())
        error, code, reason = refusal(ws)
        assert code == 1008 and "--listen-idle-s" in reason


def test_a_client_faster_than_real_time_or_past_the_session_length_is_closed():
    with client().websocket_connect("/listen") as ws:
        ws.send_text(json.dumps({"sample_rate": SR}))
        ws.receive_json()
        for _ in range(4):
            ws.send_bytes(np.zeros(SR, "<f4").tobytes())
        messages = [ws.receive_json() for _ in range(2)]  # the 2-chunk burst is answered
        assert [m["type"] for m in messages] == ["hop", "hop"]
        while (m := ws.receive_json())["type"] == "hop":
            pass
        assert m["type"] == "error" and "faster than 1.5x real time" in m["detail"]
    with client(max_listen_s=1.0, **FAST).websocket_connect("/listen") as ws:
        ws.send_text(json.dumps({"sample_rate": SR}))
        ws.receive_json()
        for _ in range(3):
            ws.send_bytes(np.zeros(SR // 2, "<f4").tobytes())
        while (m := ws.receive_json())["type"] == "hop":
            pass
        assert m["type"] == "error" and "--max-listen-s" in m["detail"]


@pytest.mark.parametrize("first, needle", [
    ("hello", "must be JSON"), ({"sample_rate": 1000}, "sample_rate=1000"), ({"sample_rate": SR, "dtype": "f64"},
                                                                             "dtype='f64'"),
    ({"sample_rate": SR, "ignore": ["thunder"]}, "'thunder' is not one of"), ({"sample_rate": SR, "top_k": 0}, "top_k=0")])
def test_a_bad_first_message_is_refused_with_what_is_allowed(first, needle):
    with client().websocket_connect("/listen") as ws:
        ws.send_text(first if isinstance(first, str) else json.dumps(first))
        error, code, _ = refusal(ws)
        assert code == 1008 and needle in error["detail"]


def test_pages_from_another_origin_may_not_listen():
    with client().websocket_connect("/listen", headers={"origin": "http://evil.example"}) as ws:
        error, code, _ = refusal(ws)
        assert code == 1008 and "--cors-origin" in error["detail"]
    with client().websocket_connect("/listen", headers={"origin": "http://testserver"}) as ws:
        ws.send_text(json.dumps({"sample_rate": SR}))
        assert ws.receive_json()["type"] == "ready"
