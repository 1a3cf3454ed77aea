"""What the server holds at once across all its requests: decoded audio, bounded by a budget that requests
take their share of before decoding. Free of any web framework, so that it is tested on its own."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Callable, Optional


class DecodingBudget:
    """Decoded audio in flight across all requests, in bytes: a request takes its share before decoding
    and gives it back when answered; one that does not fit waits until others finish, for ``timeout_s`` at
    most, then ``refuse(name, bytes in use)`` is raised (the server's 503). A request alone is always let
    through, however large: the per-request limits bound it.

    Args:
        limit_bytes (int): the bytes all requests may hold together.
        timeout_s (float): seconds a request may wait for its share.
        refuse (callable): ``(name, bytes in use) -> exception`` for a request that waited in vain.
    """

    def __init__(self, limit_bytes: int, timeout_s: float, refuse: Callable[[str, int], Exception]):
        self.limit, self.timeout_s, self.refuse, self.used = limit_bytes, timeout_s, refuse, 0
        self._changed: Optional[asyncio.Condition] = None  # made in the server's event loop, at first use

    @asynccontextmanager
    async def hold(self, n_bytes: int, name: str):
        self._changed = self._changed or asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used == 0 or self.used + n_bytes <= self.limit),
                                       self.timeout_s)
            except asyncio.TimeoutError:
                raise self.refuse(name, self.used) from None
            self.used += n_bytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n_bytes
                self._changed.notify_all()
