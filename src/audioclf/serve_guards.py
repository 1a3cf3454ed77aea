"""What bounds the connections and memory of ``audioclf serve``, below the application: the request body's
size and pace (:class:`BodyLimits`), a deadline for request headers and a cap per client address
(:class:`HeaderDeadlineProtocol`), and the decoded audio in flight across requests (:class:`DecodingBudget`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .options import ServeLimits

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class BodyLimits:
    """ASGI middleware: answer 413 to a request body over ``max_bytes``, 408 to one that stalls.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a body without one
    (chunked) is counted as it streams in and refused as soon as it passes the limit. While a body is
    still arriving, each read waits at most ``timeout_s``: a client that sends headers and then
    nothing is dropped instead of holding a connection and a worker.
    """

    def __init__(self, app, max_bytes: int, max_upload_mb: float, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.detail = f"upload too large: the limit is {max_upload_mb:g} MB (audioclf serve --max-upload-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
        received, more_body = 0, True

        async def limited_receive():
            nonlocal received, more_body
            if not more_body:  # after the body only a disconnect can come, whenever the client goes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                # Raised inside FastAPI's body parsing, which passes HTTPExceptions through to its handler.
                raise HTTPException(408, f"the request body stalled: nothing arrived for {self.timeout_s:g} s "
                                         f"(audioclf serve --timeout-s)") from None
            more_body = message.get("more_body", False) and message["type"] == "http.request"
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited_receive, send)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for a request's headers.

    uvicorn times out a connection only once it has answered a request, and any byte restarts the wait: a
    client that connects and sends nothing, or a header a byte at a time, would hold the connection for
    ever. Here a request's headers must be complete ``config.timeout_keep_alive`` seconds after the
    connection opens or the previous answer is sent.
    """

    deadline: Optional[asyncio.TimerHandle] = None
    waiting_since: float = 0.0  # loop time since the connection waits for a request's headers
    max_per_client: int = ServeLimits.max_client_connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()
        if self.client is not None:
            same = sum(getattr(c, "client", None) is not None and c.client[0] == self.client[0]
                       for c in self.connections)
            if same > self.max_per_client:
                log.warning("%s: more than %d connections from this address; closing the newest", self.client[0],
                            self.max_per_client)
                self.transport.close()
                return
        if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
            self._evict_oldest_waiting()

    def _evict_oldest_waiting(self) -> None:
        """Make room for this connection by closing the one that has waited longest for its request's
        headers: a complete request then gets the model, never a 503 behind half-open connections."""
        waiting = [c for c in self.connections
                   if c is not self and isinstance(c, HeaderDeadlineProtocol) and c.waiting()]
        if waiting:
            min(waiting, key=lambda c: c.waiting_since).transport.close()

    def waiting(self) -> bool:
        """Whether the connection holds no request: before its first one's headers, or idle after an answer."""
        return self.cycle is self._waiting_after and not self.transport.is_closing()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event) -> None:
        # the connection is the WebSocket protocol's from here on: a header deadline left armed would close
        # a live /listen stream timeout_s after it opened
        if self.deadline is not None:
            self.deadline.cancel()
        super().handle_websocket_upgrade(event)

    def _arm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        waiting_after = self.cycle  # a new cycle starts when the next request's headers are complete
        self._waiting_after, self.waiting_since = waiting_after, self.loop.time()
        self.deadline = self.loop.call_later(self.timeout_keep_alive, self._expire, waiting_after)

    def _expire(self, waiting_after) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()


class DecodingBudget:
    """Decoded audio in flight across all requests, in bytes: a request takes its share before decoding
    and gives it back when answered; one that does not fit waits until others finish, for ``timeout_s`` at
    most (then 503). A request alone is always let through, however large: the per-request limits bound it.
    """

    def __init__(self, limit_bytes: int, timeout_s: float):
        self.limit, self.timeout_s, self.used = limit_bytes, timeout_s, 0
        self._changed: Optional[asyncio.Condition] = None  # made in the server's event loop

    @asynccontextmanager
    async def hold(self, n_bytes: int, shown: str):
        self._changed = self._changed or asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used == 0 or self.used + n_bytes <= self.limit),
                                       self.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(503, f"{shown}: the server is decoding {self.used / MIB:.0f} MiB of audio for other "
                                         f"requests (audioclf serve --max-decoding-mb); retry later",
                                    headers={"Retry-After": "1"}) from None
            self.used += n_bytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n_bytes
                self._changed.notify_all()


def uvicorn_options(timeout_s: float, max_connections: int = ServeLimits.max_connections,
                    max_client_connections: int = ServeLimits.max_client_connections) -> dict:
    """uvicorn settings that bound what clients can hold: ``max_connections`` open connections (requests
    beyond get 503), each silent for at most ``timeout_s`` before its request's headers are complete, and
    as long idle between requests; ``max_client_connections`` from one address."""
    protocol = type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"max_per_client": max_client_connections})
    return {"http": protocol, "timeout_keep_alive": timeout_s, "limit_concurrency": max_connections}
