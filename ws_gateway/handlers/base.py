"""The socket all three endpoints share: authorise, join the router, write frames, close.

Authorisation runs after the handshake (``check_origin`` lets everything
through) so a refusal can carry the contract's close code: 4001 bad token,
4003 origin, 4004 dialog not found or not yours.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import tornado.websocket
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from replyx.addresses import client_address
from replyx.logs import RedactedRequestLogging
from replyx.protocol import CloseCode, SocketKind, non_negative_int, positive_id
from ws_gateway.events import PONG_FRAME

if TYPE_CHECKING:
    from ws_gateway.app import Gateway

log = logging.getLogger("ws_gateway.sockets")

class Refused(Exception):
    """Refuse a connection with a close code; ``detail`` goes to the log only."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail


def parse_dialog_id(raw: str) -> int:
    dialog_id = positive_id(raw)
    if dialog_id is None:
        raise Refused(CloseCode.NOT_FOUND, "dialog not found")
    return dialog_id


class FrameLimitedProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, with a rate limit per frame and a close code that arrives.

    ``on_message`` only sees whole data messages: pings, pongs and the fragments
    of a message never reach it, so a flood of those would escape a per-message
    limit. Here every frame read is charged; over the limit the socket is closed
    with 1008.

    Tornado closes an oversize frame (1009) by writing the close frame and closing
    the socket at once. With the client's unread bytes still in our receive buffer
    the kernel then sends a reset, which destroys the close frame before the client
    reads it: it would see 1006, not 1009. So a connection we hang up on while the
    client is still sending gets a *lingering close* instead: no more frames are
    parsed, FIN follows the close frame, and what the client still sends is read
    and discarded for up to ``LINGER_SECONDS`` before the socket is closed.
    """

    LINGER_SECONDS = 2.0

    handler: DialogSocket
    _linger_task: asyncio.Task[None] | None = None

    async def _receive_frame(self) -> None:
        await super()._receive_frame()
        if not self.client_terminated and not self.handler.allow_frame():
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


class DialogSocket(RedactedRequestLogging, tornado.websocket.WebSocketHandler):
    """One client socket on one dialog. Subclasses implement :meth:`authorize`."""

    kind: ClassVar[SocketKind]

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.dialog_id = 0
        self.sent_seq = 0
        self.buffer: list[tuple[int, int, bytes]] | None = None
        self._pending: list[bytes] | None = None  # frames held while the gateway is corked
        self._stream: IOStream | None = None
        self._joined = False
        self._closing = False
        self._server_close_code: int | None = None
        self._expiry: object | None = None
        self._opened_at = time.monotonic()

    # -- handshake -----------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        # Origins are checked in open(), after the handshake, so the client gets a close code.
        return True

    def get_compression_options(self) -> dict[str, Any] | None:
        # Frames are pre-encoded once for all sockets; per-socket deflate would undo that.
        return None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if not isinstance(protocol, tornado.websocket.WebSocketProtocol13):
            return protocol
        return FrameLimitedProtocol(self, False, protocol.params)

    async def authorize(self, dialog_id: int) -> None:
        """Raise :class:`Refused` unless this request may read ``dialog_id``."""
        raise NotImplementedError

    async def open(self, raw_id: str) -> None:
        gateway = self.gateway
        assert self.ws_connection is not None
        self._stream = self.ws_connection.stream
        gateway.sockets.add(self)
        if gateway.stopping:
            self._close(CloseCode.RESTARTING, "gateway restarting, resume with since")
            return
        if not gateway.limiter.acquire(self):
            log.warning(
                "%s refused: too many sockets from %s", self.kind.tag, client_address(self.request)
            )
            self.gateway.stats.refused[str(CloseCode.POLICY)] += 1
            self._close(CloseCode.POLICY, "too many connections from this address")
            return
        since: int | None = None
        try:
            # Tornado reads no client frame (pongs included) until open() returns: bound the
            # wait for the database well inside its ping timeout.
            async with asyncio.timeout(gateway.settings.join_timeout):
                self.dialog_id = parse_dialog_id(raw_id)
                since = self._since()
                await self.authorize(self.dialog_id)
                if since is not None and since > await gateway.store.last_seq(self.dialog_id):
                    # Seqs only ever grow: this client's state is from another database.
                    raise Refused(CloseCode.BAD_REQUEST, "since is ahead of the dialog")
                if not self.is_open:
                    return
                self._stream.max_write_buffer_size = gateway.settings.socket_buffer_limit
                self._joined = True
                await gateway.router.join(self, since)
        except Refused as refusal:
            self._refuse(refusal)
            return
        except Exception as exc:
            gateway.router.remove(self)
            if not (isinstance(exc, TimeoutError) or gateway.store.is_unavailable(exc)):
                raise
            self._refuse(Refused(CloseCode.TRY_AGAIN, "database unavailable, try again"))
            return
        if not self.is_open:
            # The client left while we were replaying.
            gateway.router.remove(self)
            return
        log.info(
            "%s connected dialog_id=%d since=%s last_seq=%d peer=%s",
            self.kind.tag, self.dialog_id, "-" if since is None else since, self.sent_seq,
            self.request.remote_ip,
        )

    def _since(self) -> int | None:
        raw = self.get_query_argument("since", None)
        if raw is None or raw == "":
            return None
        since = non_negative_int(raw)
        if since is None:
            raise Refused(CloseCode.BAD_REQUEST, "since must be a non-negative integer")
        return since

    def _refuse(self, refusal: Refused) -> None:
        self.gateway.stats.refused[str(refusal.code)] += 1
        marker = " WEBSOCKET_4003_ERROR" if refusal.code == CloseCode.FORBIDDEN_ORIGIN else ""
        log.warning(
            "%s%s refused dialog_id=%s code=%d reason=%s%s peer=%s",
            self.kind.tag, marker, self.dialog_id or "-", refusal.code, refusal.reason,
            f" {refusal.detail}" if refusal.detail else "", self.request.remote_ip,
        )
        self._close(refusal.code, refusal.reason)

    def expire_at(self, unix_time: float) -> None:
        """Close with 4001 when the credential expires (operator JWTs)."""
        if not self.is_open:
            return  # the client left during authorisation: no timer to hold it
        delay = max(0.0, unix_time - time.time())
        self._expiry = self.gateway.loop_call_later(delay, self._expired)

    def _expired(self) -> None:
        if self.is_open:
            log.info("%s token expired dialog_id=%d", self.kind.tag, self.dialog_id)
            self._close(CloseCode.UNAUTHORIZED, "token expired")

    # -- the router's side -----------------------------------------------------

    @property
    def is_open(self) -> bool:
        conn = self.ws_connection
        return not self._closing and conn is not None and not conn.is_closing()

    @property
    def is_finished(self) -> bool:
        """The connection is gone (Tornado forgets ``ws_connection`` as soon as it closes)."""
        return self._stream is None or self._stream.closed()

    def write_frame(self, frame: bytes) -> bool:
        """Queue one pre-built frame; during a routing batch, hold it for :meth:`flush_frames`.

        Holding (corking) lets the frames a socket gets from one batch of
        notifications leave in one ``send``: during a burst on a busy dialog that
        is one system call per socket instead of one per frame.
        """
        if self._closing or self._stream is None:
            return False
        corked = self.gateway.corked
        if corked is None:
            return self._send(frame)
        if self._pending is None:
            self._pending = [frame]
            corked.append(self)
        else:
            self._pending.append(frame)
        return True

    def flush_frames(self) -> None:
        """Send what :meth:`write_frame` held during the batch, in one write."""
        pending, self._pending = self._pending, None
        if pending and not self._closing and self._stream is not None:
            self._send(pending[0] if len(pending) == 1 else b"".join(pending))

    def _send(self, data: bytes) -> bool:
        """Write whole frames. The buffer limit counts what waits behind earlier frames.

        So a frame is never cut (a close frame after half a frame would corrupt the
        stream), and a frame larger than the limit still goes out when nothing is queued.
        """
        stream = self._stream
        assert stream is not None
        if stream.writing():
            try:
                stream.write(data)
            except StreamBufferFullError:
                self._too_slow()
                return False
            except StreamClosedError:
                return False
            return True
        # Nothing queued before it: hand it straight to the kernel. IOStream.write would
        # also make a Future, copy into its buffer and slice it again, per socket per frame.
        sock = stream.socket
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
            if not self._closing:
                stream.max_write_buffer_size = limit
        return True

    async def drained(self) -> None:
        stream = self._stream
        if stream is None or self._closing:
            return
        if self._pending:
            self.flush_frames()
        grace = self.gateway.settings.slow_close_grace
        try:
            await asyncio.wait_for(stream.write(b""), grace)
        except StreamClosedError:
            pass
        except TimeoutError:
            # It stopped reading in the middle of a replay; the replay must not wait for it.
            self._too_slow(f"replay not read for {grace:.0f}s")

    def _too_slow(self, detail: str = "") -> None:
        self.gateway.stats.slow_consumers_dropped += 1
        detail = detail or f"write buffer over {self.gateway.settings.socket_buffer_limit} bytes"
        log.warning(
            "%s slow consumer dialog_id=%d sent_seq=%d: %s, closing %d",
            self.kind.tag, self.dialog_id, self.sent_seq, detail, CloseCode.TOO_SLOW,
        )
        self._close(CloseCode.TOO_SLOW, "client too slow, resume with since")

    def _close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._server_close_code = code
        self.close(code, reason)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._closing = True
        if self._server_close_code is None:
            self._server_close_code = code
        if self._stream is not None:
            # The close frame must get past the buffer limit (a full buffer would raise).
            self._stream.max_write_buffer_size = None
        super().close(code, reason)

    # -- client frames ------------------------------------------------------------

    def allow_frame(self) -> bool:
        """Charge one inbound frame; over the limit, close with 1008 and return False."""
        if self._closing or self.gateway.limiter.allow_frame(self):
            # Frames still in flight while a close handshake runs are not charged.
            return True
        log.warning(
            "%s rate limit: closing %d dialog_id=%d peer=%s",
            self.kind.tag, CloseCode.POLICY, self.dialog_id, client_address(self.request),
        )
        self._close(CloseCode.POLICY, "rate limit exceeded")
        return False

    def on_message(self, message: str | bytes) -> None:
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            return
        if isinstance(data, dict) and data.get("type") == "ping" and self._joined:
            self.write_frame(PONG_FRAME)

    def on_close(self) -> None:
        if self._expiry is not None:
            self.gateway.loop_cancel(self._expiry)
            self._expiry = None
        self._closing = True
        self.gateway.sockets.discard(self)
        self.gateway.router.remove(self)
        self.gateway.limiter.release(self)
        if self._joined:
            code = self._server_close_code or self.close_code
            log.info(
                "%s disconnected dialog_id=%d code=%s sent_seq=%d after %.1fs",
                self.kind.tag, self.dialog_id, code if code is not None else "-", self.sent_seq,
                time.monotonic() - self._opened_at,
            )
