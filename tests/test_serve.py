"""The HTTP API: schemas, agreement with Classifier.classify, every bad input, and concurrent clients."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import audioclf  # noqa: E402
from audioclf import serve as serve_module  # noqa: E402
from audioclf.config import AudioclfError  # noqa: E402
from audioclf.fileio import sha256  # noqa: E402
from audioclf.predict import Classifier  # noqa: E402
from audioclf.serve import create_app  # noqa: E402

from _serving import (DURATION_S, LABELS, SAMPLE_RATE, classifier, clip, live_server,  # noqa: E402,F401
                      model_path, wav_bytes)

MAX_UPLOAD_MB = 1.0


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier, max_upload_mb=MAX_UPLOAD_MB)) as c:
        yield c


def post_wav(client, data: bytes, name: str = "clip.wav", **params):
    return client.post("/predict", params=params, files={"file": (name, data, "audio/wav")})


def assert_still_serving(client):
    assert client.get("/health").json()["status"] == "ok"
    r = post_wav(client, wav_bytes(clip("tone")))
    assert r.status_code == 200, r.text


def test_health_and_labels(client, classifier, model_path):
    health = client.get("/health").json()
    assert health == {"status": "ok", "audioclf_version": audioclf.__version__, "backbone": "resnet18",
                      "task": "multiclass", "classes": LABELS, "n_classes": len(LABELS),
                      "weights_sha256": sha256(model_path), "sample_rate": SAMPLE_RATE, "window_s": DURATION_S,
                      "device": "cpu", "max_upload_mb": MAX_UPLOAD_MB, "max_audio_s": 600.0, "max_windows": 2000}
    assert len(health["weights_sha256"]) == 64
    assert client.get("/labels").json() == {"labels": list(classifier.labels)}
    built = Classifier(classifier.model, classifier.config, LABELS, device="cpu")  # no file behind it
    assert TestClient(create_app(built)).get("/health").json()["weights_sha256"] is None


def test_page_docs_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "<audio" in page.text
    # self-contained: nothing fetched from another host (the serving machine may be offline)
    assert "src=\"http" not in page.text and "href=\"http" not in page.text and "@import" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text  # Swagger UI from the swagger-ui-bundle package: the docs work offline
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert {"/predict", "/predict_batch", "/embed", "/health", "/labels"} <= set(client.get("/openapi.json").json()["paths"])


@pytest.mark.parametrize("kind", ["tone", "noise", "clicks"])
def test_predict_matches_classifier(client, classifier, kind, tmp_path):
    wave = clip(kind, seed=3)
    r = post_wav(client, wav_bytes(wave))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"label", "confidence", "probs", "top_k", "duration_s"}
    top = body["top_k"]
    assert len(top) == 3 and all(set(t) == {"label", "prob"} for t in top)
    probs = [t["prob"] for t in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert body["label"] == top[0]["label"] and body["confidence"] == pytest.approx(top[0]["prob"])
    assert body["duration_s"] == pytest.approx(DURATION_S, abs=1e-3)
    (tmp_path / "clip.wav").write_bytes(wav_bytes(wave))
    want = classifier.classify(tmp_path / "clip.wav", top_k=3)  # same file through the Python API
    assert [t["label"] for t in top] == [t["label"] for t in want["top_k"]]
    np.testing.assert_allclose(probs, [t["prob"] for t in want["top_k"]], atol=1e-5)
    assert list(body["probs"]) == LABELS  # the full vector, in the order of /labels
    np.testing.assert_allclose(list(body["probs"].values()), want["probs"], atol=1e-5)


def post_files(client, files: list[tuple[str, bytes]], **params):
    return client.post("/predict_batch", params=params, files=[("files", (name, data, "audio/wav")) for name, data in files])


def test_predict_batch_gives_one_result_per_file_in_order(client, classifier):
    waves = {"a.wav": clip("tone", seed=1), "b.wav": clip("noise", seed=2), "c.wav": clip("chirp", seed=3, duration_s=3.0)}
    files = [(name, wav_bytes(w)) for name, w in waves.items()] + [("broken.wav", b"RIFF not audio" * 10)]
    r = post_files(client, files, top_k=2, timeline=1)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [item["file"] for item in results] == ["a.wav", "b.wav", "c.wav", "broken.wav"]
    for item, wave in zip(results, waves.values()):
        want = classifier.classify(wave, top_k=2, timeline=True)
        assert set(item) == {"file", "result"} and item["result"]["label"] == want["label"]
        np.testing.assert_allclose(list(item["result"]["probs"].values()), want["probs"], atol=1e-5)
        assert len(item["result"]["top_k"]) == 2 and len(item["result"]["windows"]) == len(want["windows"])
    assert set(results[3]) == {"file", "error"} and "broken.wav" in results[3]["error"]  # the others still classified
    assert post_files(client, []).status_code in (400, 422)
    assert_still_serving(client)


def test_predict_a_browser_recording(client, classifier, tmp_path):
    """Browsers record webm/opus (MediaRecorder), without a duration in the header: decoded through PyAV."""
    from test_audio import encode_with_pyav

    path = tmp_path / "recording.webm"
    encode_with_pyav(path, "webm", "libopus", clip("tone", duration_s=2.0), SAMPLE_RATE, live="1")
    r = client.post("/predict", files={"file": ("recording.webm", path.read_bytes(), "audio/webm")})
    assert r.status_code == 200, r.text
    want = classifier.classify(path)
    assert r.json()["label"] == want["label"] and r.json()["duration_s"] == pytest.approx(2.0, abs=0.05)
    np.testing.assert_allclose(list(r.json()["probs"].values()), want["probs"], atol=1e-5)


def test_predict_batch_limits_hold_for_the_files_together(classifier):
    # each file alone fits the 5 s limit; together they do not
    with TestClient(create_app(classifier, max_audio_s=5.0, max_windows=40)) as c:
        three = wav_bytes(clip("tone", duration_s=3.0))
        assert post_files(c, [("one.wav", three)]).status_code == 200
        r = post_files(c, [("one.wav", three), ("two.wav", three)])
        assert r.status_code == 413 and "two.wav" in r.json()["detail"] and "other files" in r.json()["detail"]
        r = post_files(c, [(f"{i}.wav", wav_bytes(clip("tone", duration_s=0.5))) for i in range(9)], window_s=0.1)
        assert r.status_code == 422 and "the limit is 40" in r.json()["detail"]


def test_embed_matches_classifier(client, classifier):
    wave = clip("clicks", seed=4, duration_s=2.5)
    r = client.post("/embed", files={"file": ("x.wav", wav_bytes(wave), "audio/wav")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == len(body["embedding"]) == 512 and body["duration_s"] == pytest.approx(2.5, abs=1e-3)
    np.testing.assert_allclose(body["embedding"], classifier.embed(wave), rtol=1e-4, atol=1e-5)
    assert client.post("/embed").status_code == 400
    assert client.post("/embed", files={"file": ("x.wav", b"not audio", "audio/wav")}).status_code == 415


def test_predict_top_k(client):
    data = wav_bytes(clip("chirp"))
    assert len(post_wav(client, data, top_k=2).json()["top_k"]) == 2
    everything = post_wav(client, data, top_k=99).json()["top_k"]  # capped at the number of classes
    assert sorted(t["label"] for t in everything) == sorted(LABELS)
    assert sum(t["prob"] for t in everything) == pytest.approx(1.0, abs=1e-5)
    assert post_wav(client, data, top_k=0).status_code == 422


def test_predict_timeline(client):
    duration_s = 4.0
    r = post_wav(client, wav_bytes(clip("warble", duration_s=duration_s)), timeline=1)
    assert r.status_code == 200, r.text
    body = r.json()
    windows = body["windows"]
    assert len(windows) >= 3
    assert all(set(w) == {"start_s", "end_s", "label", "confidence"} for w in windows)
    assert all(w["label"] in LABELS and 0 <= w["confidence"] <= 1 for w in windows)
    starts = [w["start_s"] for w in windows]
    assert starts == sorted(starts) and starts[0] == 0
    assert all(0 < w["end_s"] - w["start_s"] <= DURATION_S + 1e-6 for w in windows)
    assert windows[-1]["end_s"] <= body["duration_s"] + 1e-6
    assert "windows" not in post_wav(client, wav_bytes(clip("warble"))).json()


def multipart(data: bytes, name: str = "big.wav") -> tuple[bytes, str]:
    boundary = "audioclf-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_oversize_upload_is_413(client):
    big = wav_bytes(np.zeros(int(MAX_UPLOAD_MB * 2**20), dtype=np.float32))  # 4 MB of float samples
    r = post_wav(client, big, name="big.wav")
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert_still_serving(client)


def test_oversize_chunked_upload_is_413(client):
    body, content_type = multipart(b"\0" * int(2 * MAX_UPLOAD_MB * 2**20))
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: chunked
    r = client.post("/predict", content=chunks, headers={"content-type": content_type})
    assert r.status_code == 413
    assert_still_serving(client)


def test_upload_limit_stops_reading_part_way(client):
    """Without a Content-Length the body is counted as it arrives and refused at the limit, unread beyond."""
    body, content_type = multipart(b"\0" * int(3 * MAX_UPLOAD_MB * 2**20))
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert pulled * 65536 <= MAX_UPLOAD_MB * 2**20 + serve_module.MULTIPART_SLACK + 65536
    assert pulled < len(chunks) / 2


@pytest.mark.parametrize("data, name", [(b"this is not audio" * 64, "notes.wav"),
                                        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "truncated.wav"),
                                        (os.urandom(4096), "noise.mp3")])
def test_undecodable_upload_is_415_with_reason(client, data, name):
    r = post_wav(client, data, name=name)
    assert r.status_code == 415
    detail = r.json()["detail"]
    assert name in detail and "decode" in detail
    assert "audioclf-upload" not in detail  # the server's temp path is not leaked
    assert_still_serving(client)


def test_empty_upload_is_400(client):
    r = post_wav(client, b"", name="empty.wav")
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    assert_still_serving(client)


@pytest.mark.parametrize("kwargs", [{}, {"content": b""}, {"data": {"other": "field"}},
                                    {"files": {"audio": ("clip.wav", b"RIFF", "audio/wav")}}])
def test_missing_file_is_400(client, kwargs):
    r = client.post("/predict", **kwargs)
    assert r.status_code == 400, r.text
    assert_still_serving(client)


@pytest.mark.parametrize("name", ["../../etc/passwd.wav", "../../../../../../tmp/evil.wav", "/etc/passwd.wav",
                                  "..\\..\\evil.wav", "a/../../b.wav"])
def test_upload_name_is_never_a_path(client, monkeypatch, tmp_path, name):
    """Whatever the client calls its file, the server writes one generated name in a fresh temp dir."""
    temp_root = tmp_path / "a" / "b" / "tmp"
    temp_root.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    monkeypatch.chdir(tmp_path / "a" / "b")
    seen = []
    real_duration = serve_module.audio_duration_s

    def spy(path):
        seen.append(Path(path))
        return real_duration(path)

    monkeypatch.setattr(serve_module, "audio_duration_s", spy)
    r = post_wav(client, wav_bytes(clip("tone")), name=name)
    assert r.status_code == 200, r.text
    assert len(seen) == 1 and seen[0].name == "upload.wav" and seen[0].parent.parent == temp_root
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # written only in the temp dir, then removed
    assert not list(temp_root.iterdir())


def test_create_app_from_path_and_bad_limit(model_path):
    with TestClient(create_app(model_path, device="cpu")) as c:
        assert c.get("/labels").json()["labels"] == LABELS
    with pytest.raises(AudioclfError, match="max_upload_mb"):
        create_app(model_path, max_upload_mb=0)


def test_serve_runs_uvicorn(model_path, monkeypatch):
    calls = []
    monkeypatch.setattr(serve_module.uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    serve_module.serve(model_path, host="127.0.0.1", port=8123, max_upload_mb=5, device="cpu")
    (app, kw), = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123
    assert TestClient(app).get("/health").json()["max_upload_mb"] == 5


def test_missing_serve_extra_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` raise ImportError
    monkeypatch.delitem(sys.modules, "audioclf.serve")
    with pytest.raises(AudioclfError, match=r"pip install 'audioclf\[serve\]'"):
        importlib.import_module("audioclf.serve")


@pytest.mark.slow
def test_50_concurrent_requests_to_live_server(classifier):
    kinds = [LABELS[i % len(LABELS)] for i in range(50)]
    waves = [clip(kind, seed=i) for i, kind in enumerate(kinds)]
    want = [classifier.classify(w, SAMPLE_RATE, top_k=3) for w in waves]

    with live_server(create_app(classifier)) as url, httpx.Client(base_url=url, timeout=60) as http:
        def ask(i):
            return http.post("/predict", files={"file": (f"clip{i}.wav", wav_bytes(waves[i]), "audio/wav")})

        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(ask, range(50)))
        assert http.get("/health").status_code == 200

    assert [a.status_code for a in answers] == [200] * 50
    for got, expected in zip((a.json() for a in answers), want):
        assert got["label"] == expected["label"]
        np.testing.assert_allclose([t["prob"] for t in got["top_k"]], [t["prob"] for t in expected["top_k"]],
                                   atol=1e-5)
