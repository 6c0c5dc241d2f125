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
import os
import socket
import struct
from asyncio import Future
from collections.abc import Callable
from typing import Any, Protocol

import tornado.websocket
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.util import _websocket_mask

from replyx.protocol import CloseCode, SocketKind
from ws_gateway.metrics import Stats

log = logging.getLogger("ws_gateway.sockets")

#: Continuation, text, binary, close, ping, pong: every other opcode is reserved (1002).
_OPCODES = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})


def valid_close_code(code: int) -> bool:
    """A close code a peer may send (RFC 6455 §7.4, IANA registry); others get 1002.

    1004-1006 and 1015 are reserved and must never be sent; below 1000, unassigned
    1016-2999 and from 5000 are invalid.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameLimitedProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, held to the letter, with limits that protect the gateway.

    * Every frame read is charged (``allow_frame``): ``on_message`` only sees whole data
      messages, so a flood of pings, pongs or fragments would escape a per-message limit.
    * Protocol errors are answered with a close frame carrying their code before the TCP
      close (Tornado just drops the connection, and the client sees 1006): unmasked frames,
      RSV bits, reserved opcodes, long or fragmented control frames, a close code the RFC
      forbids → 1002; invalid UTF-8 text or close reason → 1007.
    * A message left unfinished (FIN=0, then nothing) for ``fragment_timeout`` is closed
      with 1008: a policy (time) limit, not a size one (1009 is for size, already bounded).
    * Keepalive proves that the client reads OUR bytes: each ping carries a fresh payload
      and only a pong echoing it counts (unsolicited pongs do not). Since TCP keeps order, the
      echo also proves everything written before the ping was read. No echo within
      ``pong_deadline``: closed 4008, the slow-client code.

    Tornado closes an oversize frame (1009) by writing the close frame and closing the
    socket at once. With the client's unread bytes still in our receive buffer the kernel
    then sends a reset, which destroys the close frame before the client reads it: it would
    see 1006, not 1009. So a connection we hang up on while the client is still sending
    gets a *lingering close* instead: no more frames are parsed, FIN follows the close
    frame, and what the client still sends is read and discarded for up to
    ``LINGER_SECONDS`` before the socket is closed.
    """

    LINGER_SECONDS = 2.0

    _linger_task: asyncio.Task[None] | None = None
    _fragment_timer: object | None = None

    def __init__(
        self,
        handler: tornado.websocket.WebSocketHandler,
        params: Any,
        allow_frame: Callable[[], bool],
        *,
        fragment_timeout: float = 10.0,
        pong_deadline: float | None = None,
        on_stalled: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(handler, False, params)
        self.socket_handler = handler
        self.allow_frame = allow_frame
        self.fragment_timeout = fragment_timeout
        self.pong_deadline = pong_deadline
        self._ping_payload = b""
        self.on_stalled = on_stalled

    # -- reading frames ----------------------------------------------------------------

    def _fail(self, code: int, reason: str) -> None:
        """A protocol error: our close frame with ``code``, then the (lingering) TCP close."""
        self._stop_fragment_timer()
        self.socket_handler.close(code, reason)
        self._abort()

    async def _receive_frame(self) -> None:
        header, mask_len = struct.unpack("BB", await self._read_bytes(2))
        fin = bool(header & self.FIN)
        opcode = header & self.OPCODE_MASK
        is_control = bool(opcode & 0x8)
        length = mask_len & 0x7F
        if header & self.RSV_MASK:
            return self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits set")  # no extension
        if opcode not in _OPCODES:
            return self._fail(CloseCode.PROTOCOL_ERROR, "reserved opcode")
        if not mask_len & 0x80:
            return self._fail(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
        if is_control and (length > 125 or not fin):
            return self._fail(CloseCode.PROTOCOL_ERROR, "bad control frame")
        if length == 126:
            length = struct.unpack("!H", await self._read_bytes(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self._read_bytes(8))[0]
        buffered = self._fragmented_message_buffer
        if length + (len(buffered) if buffered is not None and not is_control else 0) > (
            self.params.max_message_size
        ):
            self.close(CloseCode.TOO_BIG, "message too big")
            self._abort()
            return None
        mask = await self._read_bytes(4)
        data = _websocket_mask(mask, await self._read_bytes(length)) if length else b""
        if not self.client_terminated and not self.allow_frame():
            self._abort()
            return None
        if opcode == 0:
            if buffered is None:
                return self._fail(CloseCode.PROTOCOL_ERROR, "nothing to continue")
            buffered.extend(data)
            if not fin:
                return None
            opcode = self._fragmented_message_opcode or 0x1
            data = bytes(buffered)
            self._fragmented_message_buffer = None
            self._stop_fragment_timer()
        elif not is_control:
            if buffered is not None:
                return self._fail(CloseCode.PROTOCOL_ERROR, "message not finished")
            if not fin:
                self._fragmented_message_opcode = opcode
                self._fragmented_message_buffer = bytearray(data)
                self._fragment_timer = IOLoop.current().call_later(
                    self.fragment_timeout, self._fragment_expired)
                return None
        handled = self._handle_message(opcode, data)
        if handled is not None:
            await handled
        return None

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if self.client_terminated:
            return None
        if opcode == 0x1:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                return None
            self._message_bytes_in += len(data)
            return self._run_callback(self.handler.on_message, data.decode("utf-8"))
        if opcode == 0x8:
            self._handle_close(data)
            return None
        if opcode == 0xA:
            if self._ping_payload and data == self._ping_payload:
                self._received_pong = True
            return None  # the handler has no use for pongs
        return super()._handle_message(opcode, data)

    def _handle_close(self, data: bytes) -> None:
        """Echo a valid close code; answer 1002 (1007) to one the RFC forbids (bad reason).

        When our close frame went first, the client's is its answer: the handshake is
        complete and the connection ends now, not when Tornado's 5 s wait for it expires
        (the handler's ``close`` does nothing the second time).
        """
        self.client_terminated = True
        self._stop_fragment_timer()
        if len(data) == 1:
            return self._answer_close(CloseCode.PROTOCOL_ERROR, "bad close frame")
        if len(data) >= 2:
            code = struct.unpack("!H", data[:2])[0]
            if not valid_close_code(code):
                return self._answer_close(CloseCode.PROTOCOL_ERROR, "bad close code")
            try:
                self.close_reason = data[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._answer_close(CloseCode.INVALID_DATA, "invalid UTF-8")
            self.close_code = code
        return self._answer_close(self.close_code)

    def _answer_close(self, code: int | None, reason: str | None = None) -> None:
        if self.server_terminated:
            self.close()  # both sides have sent their close frame: the stream closes
        else:
            self.socket_handler.close(code, reason)

    def _fragment_expired(self) -> None:
        self._fragment_timer = None
        if not self.is_closing():
            self._fail(CloseCode.POLICY, "message not finished in time")

    def _stop_fragment_timer(self) -> None:
        if self._fragment_timer is not None:
            IOLoop.current().remove_timeout(self._fragment_timer)
            self._fragment_timer = None

    # -- keepalive -----------------------------------------------------------------------

    async def periodic_ping(self) -> None:
        """Ping with a fresh payload; no echo of it within the deadline: the client does not
        read what we write, whatever else it sends, and is closed 4008."""
        interval = self.ping_interval
        deadline = min(self.ping_timeout, self.pong_deadline or self.ping_timeout)
        await asyncio.sleep(interval)
        while not self.is_closing():
            self._received_pong = False
            self._ping_payload = os.urandom(8)
            started = IOLoop.current().time()
            self.write_ping(self._ping_payload)
            await asyncio.sleep(deadline)
            if not self._received_pong:
                detail = f"no pong echoing our ping within {deadline:.1f}s"
                if self.on_stalled is not None:
                    self.on_stalled(detail)
                else:
                    self.socket_handler.close(CloseCode.TOO_SLOW, "client too slow")
                return
            await asyncio.sleep(self.ping_sleep_time(
                last_ping_time=started, interval=interval, now=IOLoop.current().time()))

    def _abort(self) -> None:
        self._stop_fragment_timer()
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
            flushed = self.stream.write(b"")
        except StreamClosedError:
            return
        # Not wait_for: cancelling IOStream's own future makes its done-callback log a
        # CancelledError traceback at ERROR (a fake alarm, as a 1013 was a fake outage).
        done, _ = await asyncio.wait({flushed}, timeout=self.slow_grace)
        if not done:
            self.too_slow(f"replay not read for {self.slow_grace:.0f}s")
        elif not flushed.cancelled():
            flushed.exception()  # StreamClosedError: the client left; nothing to do

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
