"""What one client address may take from the gateway, and what all replays may hold.

* sockets per address (a cap), handshakes per address per second (a token bucket);
* inbound frames: per socket, and per address across all its sockets, so that many
  sockets each under its own limit cannot flood the event loop together;
* refusal log lines: per address, a burst of 10 then one a second (the counters count all);
* replay memory: a gateway-wide budget in bytes (:class:`ByteBudget`).

Invariant: every socket that :meth:`Limiter.acquire` counted is released exactly
once (its ``on_close``; releasing again is a no-op), so an address's count is the
number of its open sockets. A direct caller on this host (the bench, ``replyx check``)
is not held to the per-address rates or log limit, as in the backend; it is to the cap.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from typing import Protocol

from tornado.httputil import HTTPServerRequest

from replyx.addresses import client_address, is_direct_loopback, limit_key

#: Address buckets kept before idle (full) ones are forgotten.
_MAX_BUCKETS = 10_000


class Limited(Protocol):
    request: HTTPServerRequest


class Buckets:
    """Token buckets by key: ``rate`` per second, ``burst`` deep; idle ones are forgotten."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._state: dict[object, tuple[float, float]] = {}

    def take(self, key: object, now: float) -> bool:
        tokens, at = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._state) > _MAX_BUCKETS:
            self._forget_idle(now)
        return ok

    def forget(self, key: object) -> None:
        self._state.pop(key, None)

    def _forget_idle(self, now: float) -> None:
        refill = self.burst / self.rate if self.rate > 0 else math.inf
        self._state = {k: v for k, v in self._state.items() if now - v[1] < refill}

    def __len__(self) -> int:
        return len(self._state)


class Limiter:
    def __init__(
        self, max_sockets_per_ip: int, frames_per_second: float, burst: int, *,
        handshakes_per_second: float = math.inf, handshake_burst: int = 1,
        address_frames_per_second: float = math.inf, address_frame_burst: int = 1,
    ) -> None:
        self.max_sockets_per_ip = max_sockets_per_ip
        self.sockets_per_ip: Counter[str] = Counter()
        self._holders: dict[int, str] = {}
        self._frames = Buckets(frames_per_second, burst)
        self._address_frames = Buckets(address_frames_per_second, address_frame_burst)
        self._handshakes = Buckets(handshakes_per_second, handshake_burst)
        self._log_lines = Buckets(1.0, 10)

    @staticmethod
    def _key(sock: Limited) -> str | None:
        """The address the rates count under; None for a direct caller on this host."""
        if is_direct_loopback(sock.request):
            return None
        return limit_key(client_address(sock.request))

    def admit(self, sock: Limited) -> bool:
        """Charge one handshake to its address; False when the address goes too fast."""
        key = self._key(sock)
        return key is None or self._handshakes.take(key, time.monotonic())

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
        self._frames.forget(id(sock))
        if address is None:
            return
        self.sockets_per_ip[address] -= 1
        if self.sockets_per_ip[address] <= 0:
            del self.sockets_per_ip[address]

    def allow_frame(self, sock: Limited) -> bool:
        """Charge one frame to the socket's bucket and to its address's.

        Every frame counts, control frames and fragments included, not only whole messages.
        """
        now = time.monotonic()
        if not self._frames.take(id(sock), now):
            return False
        key = self._key(sock)
        return key is None or self._address_frames.take(key, now)

    def may_log(self, sock: Limited) -> bool:
        """Whether a refusal of this address may take a log line now (10, then one a second)."""
        key = self._key(sock)
        return key is None or self._log_lines.take(key, time.monotonic())


class Lease:
    """Bytes held from a :class:`ByteBudget`; give them back with :meth:`release`."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: ByteBudget, held: int) -> None:
        self._budget = budget
        self.held = held

    def shrink(self, used: int) -> None:
        """Keep only ``used`` bytes (a page smaller than reserved); never grows."""
        if used < self.held:
            self._budget.give_back(self.held - used)
            self.held = used

    def release(self) -> None:
        self._budget.give_back(self.held)
        self.held = 0


class ByteBudget:
    """A semaphore counted in bytes, first come first served (so big asks do not starve)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> Lease:
        size = min(size, self.capacity)
        if self._waiters or self.free < size:
            waiter = asyncio.get_running_loop().create_future()
            entry = (size, waiter)
            self._waiters.append(entry)
            try:
                await waiter
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                    self.give_back(0)  # those behind it may fit now
                elif not waiter.cancelled():
                    self.give_back(size)  # granted, then cancelled before it was used
                raise
        else:
            self.free -= size
        return Lease(self, size)

    def give_back(self, size: int) -> None:
        self.free += size
        while self._waiters and self._waiters[0][0] <= self.free:
            size, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.free -= size
            waiter.set_result(None)
