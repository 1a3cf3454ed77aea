"""The live endpoint of ``audioclf serve``: ``/listen``, a WebSocket that hears a stream of raw PCM and
answers every hop with the top classes and the events that opened or closed (:mod:`audioclf.stream`).

The client's first message is JSON: ``{"sample_rate": 48000, "dtype": "float32"}`` (``dtype`` ``float32``
or ``int16``, little-endian; optional ``top_k``, and ``ignore``: classes never reported as events). The
server answers ``{"type": "ready", ...}``; then each binary message is a chunk of mono samples, and each
hop's answer is a ``{"type": "hop", ...}`` message. The text message ``{"type": "stop"}`` ends the stream
as a file ends: the events still open close, ``{"type": "end"}`` follows, and the server closes.

Every session is bounded by the server's limits (:class:`~audioclf.options.ServeLimits`): the number of
listeners, the session's length, the silence allowed, the audio in one message, and the pace (a little
above real time). A client over one is sent ``{"type": "error", "detail"}`` and closed with a code and the
reason. uvicorn reads a client's next message only once the last one is handled, so a client that sends
faster than the model keeps up is slowed down by TCP, never buffered. Each hop holds the model for one
forward pass, taking its turn with the file requests' steps.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import threading
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from .errors import AudioclfError
from .options import ServeLimits
from .stream import DTYPES, TOP_K, StreamingDetector, pcm_samples

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 8000, 192000  # Hz a client may declare
MAX_TOP_K = 50
BURST_CHUNKS = 2  # chunks a client may send ahead of the pace (a browser tab that was in the background)
# close codes (RFC 6455): the session is over a limit, a message too big, the data unreadable, too many listeners
POLICY, TOO_BIG, BAD_DATA, BUSY = 1008, 1009, 1007, 1013
MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason; the error message before it has the whole text


class Refused(Exception):
    """Close the session with ``code``, saying ``detail``."""

    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def _is_stop(text) -> bool:
    try:
        return json.loads(text or "") == {"type": "stop"}
    except ValueError:
        return False


def max_message_bytes(limits: ServeLimits) -> int:
    """The largest WebSocket message uvicorn should take in at all: a chunk of ``max_chunk_s`` at the
    highest rate, in float32 (a bigger one is refused by the app with its reason before this)."""
    return int(limits.max_chunk_s * MAX_RATE * 4) + 4096


def add_listen(app: FastAPI, clf, detect_config, model_lock: threading.Lock, limits: ServeLimits) -> None:
    """Add ``/listen`` to ``app``: live streams through ``clf`` (sharing ``model_lock`` with the file
    requests), with ``detect_config``'s post-processing and ``limits``' bounds."""
    listeners = 0

    def step(steps):
        with model_lock:
            return next(steps, None)

    async def answer(ws: WebSocket, steps) -> None:
        try:
            while (message := await run_in_threadpool(step, steps)) is not None:
                await ws.send_json(message)
        except AudioclfError as e:
            raise Refused(BAD_DATA, str(e)) from None

    async def receive(ws: WebSocket) -> dict:
        try:
            message = await asyncio.wait_for(ws.receive(), limits.listen_idle_s)
        except asyncio.TimeoutError:
            raise Refused(POLICY, f"nothing arrived for {limits.listen_idle_s:g} s (audioclf serve --listen-idle-s)") \
                from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message

    def start(message: dict) -> dict:
        """The first message's settings, checked."""
        try:
            d = json.loads(message.get("text") or "")
            if not isinstance(d, dict):
                raise ValueError
        except ValueError:
            raise Refused(POLICY, 'the first message must be JSON: {"sample_rate": 48000, "dtype": "float32"}') from None
        rate, dtype, top_k, ignore = d.get("sample_rate"), d.get("dtype", "float32"), d.get("top_k", TOP_K), d.get("ignore", [])
        if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
            raise Refused(POLICY, f"sample_rate={rate!r}: give an integer from {MIN_RATE} to {MAX_RATE} Hz")
        if dtype not in DTYPES:
            raise Refused(POLICY, f"dtype={dtype!r}: give one of {', '.join(DTYPES)} (little-endian)")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise Refused(POLICY, f"top_k={top_k!r}: give an integer from 1 to {MAX_TOP_K}")
        unknown = [x for x in ignore if x not in clf.labels] if isinstance(ignore, list) else [ignore]
        if unknown:
            raise Refused(POLICY, f"ignore: {str(unknown[0])[:60]!r} is not one of the model's classes")
        return {"sample_rate": rate, "dtype": dtype, "top_k": top_k, "ignore": ignore}

    async def session(ws: WebSocket) -> None:
        settings = start(await receive(ws))
        rate, dtype = settings["sample_rate"], settings["dtype"]
        detector = StreamingDetector(clf, detect_config, sample_rate=rate, hop_s=limits.listen_hop_s,
                                     top_k=settings["top_k"], ignore=settings["ignore"])
        features = clf.config.features
        await ws.send_json({"type": "ready", "sample_rate": features.sample_rate, "window_s": detector.window_s,
                            "hop_s": limits.listen_hop_s, "n_classes": len(clf.labels),
                            "max_listen_s": limits.max_listen_s, "max_chunk_s": limits.max_chunk_s})
        loop, received_s = asyncio.get_running_loop(), 0.0
        started = loop.time()
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        max_bytes = int(limits.max_chunk_s * rate) * itemsize
        while True:
            message = await receive(ws)
            data = message.get("bytes")
            if data is None:
                if _is_stop(message.get("text")):
                    await answer(ws, detector.steps(last=True))
                    await ws.send_json({"type": "end", "time_s": round(detector.time_s, 3)})
                    await ws.close(1000, "stopped")
                    return
                raise Refused(POLICY, 'after the first message, send binary PCM chunks, or {"type": "stop"} to end')
            if len(data) > max_bytes:
                raise Refused(TOO_BIG, f"a chunk of {len(data)} bytes: the limit is {max_bytes} ({limits.max_chunk_s:g} s "
                                       f"at {rate} Hz, audioclf serve --max-chunk-s)")
            received_s += len(data) / itemsize / rate
            if received_s > limits.max_listen_s:
                raise Refused(POLICY, f"the session reached {limits.max_listen_s:g} s of audio (audioclf serve "
                                      f"--max-listen-s); reconnect to go on")
            allowed = (loop.time() - started) * limits.max_listen_speed + BURST_CHUNKS * limits.max_chunk_s
            if received_s > allowed:
                raise Refused(POLICY, f"audio arrives faster than {limits.max_listen_speed:g}x real time (audioclf serve "
                                      f"--max-listen-speed): stream it as it is recorded")
            try:
                detector.feed(pcm_samples(data, dtype))
            except AudioclfError as e:
                raise Refused(BAD_DATA, str(e)) from None
            await answer(ws, detector.steps())

    worklet = importlib.resources.files("audioclf").joinpath("static/listen-worklet.js").read_text(encoding="utf-8")

    @app.get("/listen-worklet.js", include_in_schema=False)
    def listen_worklet():
        """The page's AudioWorklet: a module the browser loads by URL."""
        return Response(worklet, media_type="text/javascript")

    @app.websocket("/listen")
    async def listen(ws: WebSocket):
        nonlocal listeners
        await ws.accept()  # so that a refusal's reason reaches the client (before it, only HTTP 403 can)
        try:
            origin = ws.headers.get("origin")
            # browsers let any page open a WebSocket anywhere: only this server's page (or --cors-origin) may
            if origin and urlsplit(origin).netloc != ws.headers.get("host") and origin != limits.cors_origin:
                raise Refused(POLICY, f"pages from {origin[:60]} may not listen here (audioclf serve --cors-origin)")
            if listeners >= limits.max_listeners:
                raise Refused(BUSY, f"{listeners} listeners already: the limit is {limits.max_listeners} (audioclf serve "
                                    f"--max-listeners); try again later")
            listeners += 1
            try:
                await session(ws)
            finally:
                listeners -= 1
        except Refused as e:
            log.info("/listen closed: %s", e.detail)
            try:
                await ws.send_json({"type": "error", "detail": e.detail})
                await ws.close(e.code, e.detail.encode()[:MAX_REASON_BYTES].decode(errors="ignore"))
            except (WebSocketDisconnect, RuntimeError):
                pass  # the client has gone already
        except WebSocketDisconnect:
            pass
