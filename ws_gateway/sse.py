"""Server-sent events: the gateway's frames as ``text/event-stream`` events, rendered once.

Every part of the gateway (router, workspace, presence) builds a frame once per
event as RFC 6455 bytes (:mod:`ws_gateway.frames`) and writes the same object
to every subscriber. A WebSocket subscriber writes it as it is; an SSE
subscriber asks :class:`Streams` for its event-stream rendering, which is
memoised on the frame object, so an event is rendered once per transport
however many streams receive it, and the WebSocket path does no extra work.

Rendering (the contract's "SSE transport"): a frame's JSON goes in ``data:``
lines of an unnamed event; a ``message`` carries ``id: <seq>`` and a dialog's
``ready`` ``id: <last_seq>``, so the browser's own reconnect sends
``Last-Event-ID`` and resumes exactly like ``since``. Typing, read, presence,
dialog and snapshot events carry no id: they never move the resume point. A
close is ``event: close`` with ``data: {"code","reason"}``; an idle stream gets
a ``: keep-alive`` comment every ``keep_alive`` seconds.

Keep-alives (invariant): a stream that wrote an event in the last ``keep_alive``
seconds gets none, and one pass of the ticker visits only a ``1/SLICES`` share of
the streams, so no callback writes to more than that share at once. Written to all
2,000 streams of the benchmark in one callback, the comments held every frame
back ~30-50 ms (the SSE turns' max latency). An idle stream's silence between two
writes is at most ``keep_alive * (SLICES + 1) / SLICES`` (11 s by default, under
the contract's 15 s).
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

import orjson
from tornado.ioloop import PeriodicCallback

from replyx.protocol import FrameType

log = logging.getLogger("ws_gateway.sse")

#: Sent once, first: how long a browser waits before its own reconnect (milliseconds).
RETRY_MS = 1000
KEEP_ALIVE = b": keep-alive\n\n"
#: Frames remembered with their rendering; a fan-out writes one frame to all its streams
#: in a row, so only the frames of a few recent events are ever asked for again.
CACHE_FRAMES = 256
#: Frames larger than this are rendered per stream rather than kept alive by the cache.
CACHE_MAX_BYTES = 64 * 1024
#: The keep-alive interval is cut in this many ticks; each tick visits this share of streams.
SLICES = 10


def ws_payload(frame: bytes) -> bytes:
    """The payload of a complete, unmasked RFC 6455 frame built by :mod:`ws_gateway.frames`."""
    length = frame[1] & 0x7F
    return frame[2:] if length < 126 else frame[4:] if length == 126 else frame[10:]


def render(payload: bytes) -> bytes:
    """One JSON frame as an event-stream event (with ``id:`` for messages and ``ready``)."""
    head = b""
    if payload.startswith(b"{") and (b'"message"' in payload or b'"ready"' in payload):
        data = orjson.loads(payload)
        kind = data.get("type") if isinstance(data, dict) else None
        seq = (data.get("seq") if kind == FrameType.MESSAGE
               else data.get("last_seq") if kind == FrameType.READY else None)
        if isinstance(seq, int) and not isinstance(seq, bool):
            head = b"id: %d\n" % seq
    if b"\n" not in payload and b"\r" not in payload:
        return head + b"data: " + payload + b"\n\n"
    # JSON may hold raw line breaks between tokens (a hand-made NOTIFY): one data line each.
    return head + b"".join(b"data: " + line + b"\n" for line in payload.splitlines()) + b"\n"


def close_event(code: int, reason: str) -> bytes:
    return b"event: close\ndata: " + orjson.dumps({"code": code, "reason": reason}) + b"\n\n"


class KeptAlive(Protocol):
    #: :attr:`Streams.ticks` when the stream last wrote an event (set by the stream).
    written_tick: int

    def keep_alive(self) -> None:
        """Write a comment line unless the stream is busy or closing."""


class Streams:
    """Every SSE stream's shared parts: the rendering cache and the keep-alive ticker."""

    def __init__(self, keep_alive: float = 10.0) -> None:
        self.keep_alive_interval = keep_alive
        self.open: set[KeptAlive] = set()
        self.ticks = 0  # keep-alive ticks so far: a stream's clock of its last event
        self._rotation: collections.deque[KeptAlive] = collections.deque()  # visiting order
        self.rendered = 0  # renderings made (each shared by every stream of its event)
        self._cache: dict[int, tuple[bytes, bytes]] = {}
        self._ticker: PeriodicCallback | None = None

    def event(self, frame: bytes) -> bytes:
        """The SSE rendering of a frame, made once per frame object and then reused."""
        key = id(frame)
        entry = self._cache.get(key)
        if entry is not None and entry[0] is frame:
            return entry[1]
        self.rendered += 1
        event = render(ws_payload(frame))
        if len(frame) <= CACHE_MAX_BYTES:
            cache = self._cache
            if len(cache) >= CACHE_FRAMES:
                del cache[next(iter(cache))]
            # The entry holds the frame itself, so its id cannot be reused while cached.
            cache[key] = (frame, event)
        return event

    def add(self, stream: KeptAlive) -> None:
        stream.written_tick = self.ticks  # its response head has just gone out
        self.open.add(stream)
        self._rotation.append(stream)
        if self._ticker is None:
            self._ticker = PeriodicCallback(self._tick, self.keep_alive_interval * 1000 / SLICES)
            self._ticker.start()

    def discard(self, stream: KeptAlive) -> None:
        self.open.discard(stream)  # and out of the rotation when its turn comes

    def _tick(self) -> None:
        """Visit the next ``1/SLICES`` of the streams; keep alive those idle since their
        last visit (``SLICES - 1`` ticks or more without an event)."""
        self.ticks += 1
        rotation, open_ = self._rotation, self.open
        for _ in range(-(-len(rotation) // SLICES)):
            stream = rotation.popleft()
            if stream not in open_:
                continue
            rotation.append(stream)
            if self.ticks - stream.written_tick >= SLICES - 1:
                try:
                    stream.keep_alive()
                except Exception:
                    log.exception("keep-alive failed")

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
