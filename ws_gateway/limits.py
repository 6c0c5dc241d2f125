"""Per-address socket caps and per-socket inbound frame rate limits.

Invariant: every socket that :meth:`Limiter.acquire` counted is released exactly
once (its ``on_close``), so an address's count is the number of its open sockets.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Protocol

from tornado.httputil import HTTPServerRequest

from replyx.addresses import client_address, limit_key


class Limited(Protocol):
    request: HTTPServerRequest


class Limiter:
    def __init__(self, max_sockets_per_ip: int, frames_per_second: float, burst: int) -> None:
        self.max_sockets_per_ip = max_sockets_per_ip
        self.rate = frames_per_second
        self.burst = float(burst)
        self.sockets_per_ip: Counter[str] = Counter()
        self._holders: dict[int, str] = {}
        self._buckets: dict[int, tuple[float, float]] = {}

    def acquire(self, sock: Limited) -> bool:
        """Count a new socket against its address; False when the address is at its cap."""
        address = limit_key(client_address(sock.request))
        if self.sockets_per_ip[address] >= self.max_sockets_per_ip:
            return False
        self.sockets_per_ip[address] += 1
        self._holders[id(sock)] = address
        return True

    def release(self, sock: Limited) -> None:
        address = self._holders.pop(id(sock), None)
        self._buckets.pop(id(sock), None)
        if address is None:
            return
        self.sockets_per_ip[address] -= 1
        if self.sockets_per_ip[address] <= 0:
            del self.sockets_per_ip[address]

    def allow_frame(self, sock: Limited) -> bool:
        """Charge one frame to the socket's token bucket (``rate`` per second, ``burst`` deep).

        Every frame counts, control frames and fragments included, not only whole messages.
        """
        now = time.monotonic()
        tokens, at = self._buckets.get(id(sock), (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[id(sock)] = (tokens, now)
            return False
        self._buckets[id(sock)] = (tokens - 1.0, now)
        return True
