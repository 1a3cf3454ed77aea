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
def test_exhaustion_connections_past_max_connections_make_room_for_complete_requests(classifier):
    """Half-open connections (no request yet, renewed as they expire) never keep a complete request out:
    past max_connections a new connection displaces the one that has waited longest."""
    with live_server(create_app(classifier), **serve_module.uvicorn_options(30.0, max_connections=4)) as url:
        port = int(url.rsplit(":", 1)[1])
        held = []
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            held.append(s)
        time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as http:
            assert [http.get("/health").status_code for _ in range(3)] == [200] * 3
        for s in held:
            s.close()


@pytest.mark.slow
def test_exhaustion_connections_per_client_address_are_capped(classifier):
    with live_server(create_app(classifier), **serve_module.uvicorn_options(30.0, max_client_connections=3)) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for s in held:
            s.settimeout(5)
        assert held[4].recv(100) == b"" and held[3].recv(100) == b""  # closed at once, not after the timeout
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(100).startswith(b"HTTP/1.1 200")  # the first three are served
        for s in held:
            s.close()


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
    assert kw["timeout_keep_alive"] == 3 and issubclass(kw["http"], serve_module.HeaderDeadlineProtocol)
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


# ---------------------------------------------------------------------------------------------- issue 21

@pytest.mark.parametrize("params, says", [({"hop_s": "inf"}, "finite"), ({"hop_s": "1e308"}, "hop_s=1e+308"),
                                          ({"hop_s": "nan"}, "finite"), ({"window_s": "nan"}, "finite"),
                                          ({"window_s": "inf"}, "finite"), ({"window_s": "-inf"}, "")])
def test_non_finite_request_parameters_get_422_saying_so(client, params, says):
    r = post(client, wav_bytes(clip("tone")), **params)
    assert r.status_code == 422 and says in r.text and "greater than 0" not in r.text.replace("-inf", ""), r.text


def test_non_finite_features_are_an_error_for_that_file(classifier):
    from dataclasses import replace

    from audioclf.predict import Classifier

    config = replace(classifier.config, features=replace(classifier.config.features, peak_normalize=False))
    loud = Classifier(classifier.model, config, classifier.labels, device="cpu")
    huge = np.full(SAMPLE_RATE, 1e30, np.float32)
    huge[::2] *= -1
    with TestClient(create_app(loud)) as c:
        r = post(c, wav_bytes(huge))
        assert r.status_code == 422 and "not finite" in r.json()["detail"], r.text
        assert post(c, wav_bytes(clip("tone"))).status_code == 200


def test_exhaustion_decoded_audio_in_flight_is_bounded_server_wide(classifier, monkeypatch):
    """A request whose decoding does not fit beside the others' waits; past --timeout-s it gets 503."""
    real, started = classifier._forward, []

    def slow_forward(batch, *head):
        started.append(time.monotonic())
        time.sleep(0.3)
        real(batch, *head)

    monkeypatch.setattr(classifier, "_forward", slow_forward)
    one = wav_bytes(clip("noise", duration_s=8.0))  # 8 s at 16 kHz: 0.5 MB of float32 decoded
    app = create_app(classifier, max_decoding_mb=0.6, timeout_s=0.5)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
        first = pool.submit(http.post, "/predict", files={"file": ("a.wav", one, "audio/wav")})
        while not started:
            time.sleep(0.01)
        second = http.post("/predict", files={"file": ("b.wav", one, "audio/wav")})
        assert second.status_code == 503 and "--max-decoding-mb" in second.text, second.text
        assert first.result().status_code == 200
        assert http.post("/predict", files={"file": ("c.wav", one, "audio/wav")}).status_code == 200  # alone: served


@pytest.mark.parametrize("origin", ["not a url", "https://app.example/path", "ftp://app.example", "https://",
                                    "https://app.example:99999", "app.example"])
def test_poor_messages_cors_origin_is_validated(model_path, monkeypatch, capsys, origin):
    monkeypatch.setattr(serve_module.uvicorn, "run", lambda *a, **k: pytest.fail("served despite a bad origin"))
    assert main(["serve", str(model_path), "--cors-origin", origin]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an origin" in err and "Traceback" not in err
    from audioclf.options import check_origin

    assert check_origin("http://localhost:3000") == "http://localhost:3000"
