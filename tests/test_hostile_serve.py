"""The server under hostile clients: every limit on a request's work, memory and time, CORS, and the
``serve`` flags' messages. Each limit is exercised at its edge."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from audioclf import serve as serve_module  # noqa: E402
from audioclf.cli import main  # noqa: E402
from audioclf.config import AudioclfError  # noqa: E402
from audioclf.serve import create_app  # noqa: E402

from _serving import (SAMPLE_RATE, classifier, clip, live_server, model_path,  # noqa: E402,F401
                      wav_bytes)


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier, max_audio_s=4.0, max_windows=10)) as c:
        yield c


@pytest.fixture
def forwards(classifier, monkeypatch) -> list[int]:
    """The number of windows in each of the model's forward passes, as they happen."""
    seen, real = [], classifier._forward

    def spy(batch, *head):
        if batch:  # the last call of a run may have nothing left to do
            seen.append(len(batch))
        real(batch, *head)

    monkeypatch.setattr(classifier, "_forward", spy)
    return seen


def post(client, data: bytes, name: str = "clip.wav", **params):
    return client.post("/predict", params=params, files={"file": (name, data, "audio/wav")})


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def flac_claiming(seconds: float) -> bytes:
    """A one-second FLAC whose header (STREAMINFO total samples) claims ``seconds`` of audio."""
    buf = io.BytesIO()
    sf.write(buf, clip("tone"), SAMPLE_RATE, format="FLAC")
    data = bytearray(buf.getvalue())
    total = int(seconds * SAMPLE_RATE)  # 36 bits: the low 4 bits of byte 21, then bytes 22-25
    data[21] = (data[21] & 0xF0) | (total >> 32)
    data[22:26] = struct.pack(">I", total & 0xFFFFFFFF)
    return bytes(data)


def asgi_post(app, body: bytes, headers: list, receive_after_body):
    """Drive the ASGI app directly: the body in one message, then whatever ``receive_after_body`` does.
    Returns the messages the app sent."""
    sent, given = [], False

    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive_after_body()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("t", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    return sent


def multipart(data: bytes) -> tuple[bytes, list]:
    request = httpx.Request("POST", "http://t/predict", files={"file": ("clip.wav", data, "audio/wav")})
    return request.read(), [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]


# ---------------------------------------------------------------------------------------------- duration

def test_audio_over_max_audio_s_is_413_from_the_header_before_decoding(client, forwards):
    r = post(client, wav_bytes(silence(4.5)), name="long.wav")
    assert r.status_code == 413
    assert "long.wav" in r.json()["detail"] and "4.5 s" in r.json()["detail"] and "--max-audio-s" in r.json()["detail"]
    # 10 hours claimed by a 1-s file's header: refused at once, nothing decoded, the model never runs
    t0 = time.monotonic()
    r = post(client, flac_claiming(10 * 3600), name="ten_hours.flac")
    assert r.status_code == 413 and "36000.0 s" in r.json()["detail"]
    assert time.monotonic() - t0 < 5 and forwards == []
    assert post(client, wav_bytes(silence(3.9))).status_code == 200  # under the limit


def test_a_header_that_understates_the_length_is_caught_while_decoding(client, monkeypatch, forwards):
    monkeypatch.setattr(serve_module, "audio_duration_s", lambda path: 1.0)  # the header lies: "1 s"
    r = post(client, wav_bytes(clip("noise", duration_s=8.0)), name="liar.wav", hop_s=1.0)
    assert r.status_code == 413, r.text
    assert "liar.wav" in r.json()["detail"] and "4 s" in r.json()["detail"]
    assert "audioclf-upload" not in r.json()["detail"]
    assert sum(forwards) <= 4  # stopped at the limit: windows 0-1 .. 3-4 s at most


# ---------------------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("params, named, allowed", [
    ({"window_s": 3600}, "window_s=3600", "0.1 to 60 s"),
    ({"window_s": 0.05}, "window_s=0.05", "0.1 to 60 s"),
    ({"window_s": 100, "hop_s": 15}, "window_s=100", "0.1 to 60 s"),
    ({"hop_s": 0.001}, "hop_s=0.001", "hop_s >= 0.25 s"),
    ({"window_s": 2, "hop_s": 0.4}, "hop_s=0.4", "hop_s >= 0.5 s"),
])
def test_window_and_hop_out_of_range_are_422_naming_the_range(client, forwards, params, named, allowed):
    r = post(client, wav_bytes(clip("tone", duration_s=2.0)), **params)
    assert r.status_code == 422, r.text
    assert named in r.json()["detail"] and allowed in r.json()["detail"]
    assert forwards == []


def test_more_windows_than_max_windows_is_422_before_decoding(client, forwards):
    r = post(client, wav_bytes(clip("noise", duration_s=3.5)), hop_s=0.25)  # 11 windows of 1 s
    assert r.status_code == 422
    assert "11 windows" in r.json()["detail"] and "limit is 10" in r.json()["detail"]
    assert forwards == []
    r = post(client, wav_bytes(clip("noise", duration_s=3.5)), hop_s=0.3, timeline=1)  # 10 windows: allowed
    assert r.status_code == 200 and len(r.json()["windows"]) == 10


def test_the_model_runs_a_few_windows_per_step_whatever_window_s(client, forwards):
    assert post(client, wav_bytes(clip("noise", duration_s=3.9))).status_code == 200  # 7 windows
    assert forwards and max(forwards) <= serve_module.STEP_WINDOWS  # 1-s windows: 4 per step
    forwards.clear()
    r = post(client, wav_bytes(clip("noise", duration_s=1.0)), window_s=60)  # padded to one 60-s window
    assert r.status_code == 200 and forwards == [1]


# ---------------------------------------------------------------------------------------------- time

def test_a_request_whose_client_disconnected_is_cancelled(classifier, forwards):
    app = create_app(classifier, max_windows=1000)
    body, headers = multipart(wav_bytes(clip("noise", duration_s=60.0)))  # 119 windows: 30 steps

    async def gone():
        return {"type": "http.disconnect"}

    sent = asgi_post(app, body, headers, gone)
    assert sent[0]["status"] == serve_module.CLIENT_CLOSED
    assert 1 <= len(forwards) <= 2 and sum(forwards) < 119


def test_a_stalled_body_is_dropped_after_timeout_s(classifier):
    app = create_app(classifier, timeout_s=0.3)
    body, headers = multipart(wav_bytes(clip("tone")))
    sent, pulled = [], 0

    async def receive():  # half the body, then nothing: the client stalls
        nonlocal pulled
        pulled += 1
        if pulled == 1:
            return {"type": "http.request", "body": body[:len(body) // 2], "more_body": True}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("t", 80)}
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert time.monotonic() - t0 < 10
    assert sent[0]["status"] == 408 and b"--timeout-s" in sent[1]["body"]


@pytest.mark.slow
def test_silent_and_half_sent_connections_are_closed(classifier):
    with live_server(create_app(classifier), **serve_module.uvicorn_options(0.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        silent, half = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        for s in (silent, half):
            s.settimeout(10)
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the server
            assert time.monotonic() - t0 < 5
            s.close()
        # a well-behaved client on a kept-alive connection is unaffected
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            time.sleep(0.2)
            assert http.get("/labels").status_code == 200


@pytest.mark.slow
def test_connections_past_max_connections_get_503(classifier):
    with live_server(create_app(classifier), **serve_module.uvicorn_options(30.0, max_connections=2)) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            held = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(2)]
            time.sleep(0.2)
            assert http.get("/health").status_code == 503
            for s in held:
                s.close()
            time.sleep(0.2)
            assert http.get("/health").status_code == 200


@pytest.mark.slow
def test_a_long_request_does_not_starve_short_ones(classifier, monkeypatch):
    real = classifier._forward
    long_steps = []

    def slow_forward(batch, *head):  # every step takes a while, so the long request lasts seconds on any machine
        time.sleep(0.05)
        if len(batch) > 1:
            long_steps.append(time.monotonic())
        real(batch, *head)

    monkeypatch.setattr(classifier, "_forward", slow_forward)
    long_wav, short_wav = wav_bytes(clip("noise", duration_s=60.0)), wav_bytes(clip("tone"))
    with live_server(create_app(classifier)) as url, httpx.Client(base_url=url, timeout=120) as http:
        with ThreadPoolExecutor(1) as pool:
            long_answer = pool.submit(http.post, "/predict", files={"file": ("long.wav", long_wav, "audio/wav")})
            deadline = time.monotonic() + 60
            while len(long_steps) < 2 and not long_answer.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            short = [http.post("/predict", files={"file": ("short.wav", short_wav, "audio/wav")}) for _ in range(3)]
            assert not long_answer.done(), long_answer.result().text  # the short requests were answered between the long one's steps
            assert long_answer.result().status_code == 200
    assert [r.status_code for r in short] == [200] * 3


# ---------------------------------------------------------------------------------------------- CORS

def test_cors_is_off_by_default_and_one_origin_can_be_allowed(classifier):
    preflight = {"Origin": "https://other.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(classifier)) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://other.example"}).headers
        assert "access-control-allow-origin" not in c.options("/predict", headers=preflight).headers
    with TestClient(create_app(classifier, cors_origin="https://app.example")) as c:
        ok = c.options("/predict", headers={**preflight, "Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert c.get("/health", headers={"Origin": "https://app.example"}).headers[
            "access-control-allow-origin"] == "https://app.example"
        other = c.options("/predict", headers=preflight)
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, named", [
    (["--max-upload-mb", "nan"], "max_upload_mb=nan"), (["--max-upload-mb", "inf"], "max_upload_mb=inf"),
    (["--port", "70000"], "port=70000"), (["--port", "-1"], "port=-1"),
    (["--max-audio-s", "nan"], "max_audio_s=nan"), (["--max-audio-s", "0"], "max_audio_s=0"),
    (["--max-windows", "0"], "max_windows=0"), (["--timeout-s", "-1"], "timeout_s=-1"),
    (["--max-connections", "0"], "max_connections=0"),
])
def test_serve_flags_out_of_range_are_one_line_and_exit_2(model_path, monkeypatch, capsys, flags, named):
    monkeypatch.setattr(serve_module.uvicorn, "run", lambda *a, **k: pytest.fail("served despite a bad flag"))
    assert main(["serve", str(model_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_serve_passes_the_limits_through(model_path, monkeypatch):
    calls = []
    monkeypatch.setattr(serve_module.uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    assert main(["serve", str(model_path), "--max-audio-s", "2", "--timeout-s", "3", "--cors-origin",
                 "https://app.example", "--device", "cpu"]) == 0
    (app, kw), = calls
    assert kw["timeout_keep_alive"] == 3 and kw["http"] is serve_module.HeaderDeadlineProtocol
    assert kw["limit_concurrency"] == serve_module.MAX_CONNECTIONS
    with TestClient(app) as c:
        r = post(c, wav_bytes(silence(2.5)))
        assert r.status_code == 413 and "limit is 2 s" in r.json()["detail"]
        assert c.get("/health", headers={"Origin": "https://app.example"}).headers[
            "access-control-allow-origin"] == "https://app.example"


def test_create_app_refuses_nan_limits(classifier):
    for bad in ({"max_upload_mb": float("nan")}, {"max_audio_s": float("inf")}, {"timeout_s": float("nan")}):
        with pytest.raises(AudioclfError, match="finite"):
            create_app(classifier, **bad)
