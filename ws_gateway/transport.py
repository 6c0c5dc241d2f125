"""Bytes to and from one client: the frame reader's limits, the write path, slow clients.

Invariants: only whole frames are written (a close frame after half a frame
would corrupt the stream); what may wait in a socket's buffer behind earlier
frames is bounded, and a client that lets it overflow, or leaves a replay
unread for the grace period, is closed with 4008 (it resumes with ``since``);
every inbound frame, control frames and fragments included, is charged to the
socket's rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

import tornado.websocket
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from replyx.protocol import CloseCode, SocketKind
from ws_gateway.metrics import Stats

log = logging.getLogger("ws_gateway.sockets")


class FrameLimitedProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, with a rate limit per frame and a close code that arrives.

    ``on_message`` only sees whole data messages: pings, pongs and the fragments
    of a message never reach it, so a flood of those would escape a per-message
    limit. Here every frame read is charged (``allow_frame``); over the limit the
    socket is closed with 1008.

    Tornado closes an oversize frame (1009) by writing the close frame and closing
    the socket at once. With the client's unread bytes still in our receive buffer
    the kernel then sends a reset, which destroys the close frame before the client
    reads it: it would see 1006, not 1009. So a connection we hang up on while the
    client is still sending gets a *lingering close* instead: no more frames are
    parsed, FIN follows the close frame, and what the client still sends is read
    and discarded for up to ``LINGER_SECONDS`` before the socket is closed.
    """

    LINGER_SECONDS = 2.0

    _linger_task: asyncio.Task[None] | None = None

    def __init__(
        self,
        handler: tornado.websocket.WebSocketHandler,
        params: Any,
        allow_frame: Callable[[], bool],
    ) -> None:
        super().__init__(handler, False, params)
        self.allow_frame = allow_frame

    async def _receive_frame(self) -> None:
        await super()._receive_frame()
        if not self.client_terminated and not self.allow_frame():
            self._abort()

    def _abort(self) -> None:
        if self._linger_task is not None and not self._linger_task.done():
            return  # the lingering close ends the connection itself, shortly
        stream = self.stream
        if (
            self.server_terminated  # our close frame is written
            and not self.client_terminated
            and stream is not None
            and not stream.closed()
            and not stream.reading()  # called between frames, not from a timer mid-read
        ):
            self.client_terminated = True  # the frame loop stops: nothing more is parsed
            self._linger_task = asyncio.ensure_future(self._linger(stream))
            return
        super()._abort()

    async def _linger(self, stream: IOStream) -> None:
        try:
            async with asyncio.timeout(self.LINGER_SECONDS):
                await stream.write(b"")  # the close frame has left our buffer
                if stream.socket is not None:
                    stream.socket.shutdown(socket.SHUT_WR)
                while True:
                    await stream.read_bytes(64 * 1024, partial=True)
        except (StreamClosedError, OSError, TimeoutError):
            pass
        finally:
            super()._abort()


class Owner(Protocol):
    """The socket a transport writes for, as its slow-client policy sees it."""

    dialog_id: int
    sent_seq: int

    @property
    def kind(self) -> SocketKind: ...

    @property
    def transport_name(self) -> str:
        """``ws`` or ``sse``: this write path serves both (whole frames, or whole events)."""

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Transport:
    """The write path of one socket or event stream: whole frames (or events) into its
    IOStream, within a buffer limit."""

    __slots__ = ("buffer_limit", "closing", "owner", "slow_grace", "stats", "stream")

    def __init__(
        self, owner: Owner, stream: IOStream, stats: Stats, *,
        buffer_limit: int, slow_grace: float,
    ) -> None:
        self.owner = owner
        self.stream = stream
        self.stats = stats
        self.buffer_limit = buffer_limit
        self.slow_grace = slow_grace
        self.closing = False

    @property
    def dialog_id(self) -> int:
        return self.owner.dialog_id

    @property
    def finished(self) -> bool:
        """The connection is gone."""
        return self.stream.closed()

    def limit(self) -> None:
        """From now on, what waits behind earlier frames may not pass ``buffer_limit``."""
        self.stream.max_write_buffer_size = self.buffer_limit

    def close(self) -> None:
        """Stop writing frames; the close frame must get past the buffer limit."""
        self.closing = True
        self.stream.max_write_buffer_size = None

    def fail(self, code: int, reason: str) -> None:
        self.owner.close(code, reason)

    def write(self, data: bytes) -> bool:
        """Write whole frames. The buffer limit counts what waits behind earlier frames.

        So a frame is never cut (a close frame after half a frame would corrupt the
        stream), and a frame larger than the limit still goes out when nothing is queued.
        """
        if self.closing:
            return False
        stream = self.stream
        if stream.writing():
            try:
                stream.write(data)
            except StreamBufferFullError:
                self.too_slow()
                return False
            except StreamClosedError:
                return False
            return True
        # Nothing queued before it: hand it straight to the kernel. IOStream.write would
        # also make a Future, copy into its buffer and slice it again, per socket per frame.
        # (Tornado's annotation says otherwise, but a closed stream's socket is None.)
        sock: socket.socket | None = stream.socket
        if sock is None:
            return False
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error that stream.write below meets and closes on
        if sent == len(data):
            return True
        limit, stream.max_write_buffer_size = stream.max_write_buffer_size, None
        try:
            stream.write(data[sent:])
        except StreamClosedError:
            return False
        finally:
            if not self.closing:
                stream.max_write_buffer_size = limit
        return True

    async def drained(self) -> None:
        """Wait until what was written so far has reached the kernel, within the grace.

        A client that stopped reading in the middle of a replay is closed with 4008:
        the replay must not wait for it.
        """
        if self.closing:
            return
        try:
            await asyncio.wait_for(self.stream.write(b""), self.slow_grace)
        except StreamClosedError:
            pass
        except TimeoutError:
            self.too_slow(f"replay not read for {self.slow_grace:.0f}s")

    def too_slow(self, detail: str = "") -> None:
        """The slow-client policy: count, log, close with 4008 (the client resumes with since)."""
        self.stats.slow_consumers_dropped += 1
        owner = self.owner
        detail = detail or f"write buffer over {self.buffer_limit} bytes"
        log.warning(
            "%s slow consumer dialog_id=%d sent_seq=%d: %s, closing %d transport=%s",
            owner.kind.tag, owner.dialog_id, owner.sent_seq, detail, CloseCode.TOO_SLOW,
            owner.transport_name,
        )
        owner.close(CloseCode.TOO_SLOW, "client too slow, resume with since")
