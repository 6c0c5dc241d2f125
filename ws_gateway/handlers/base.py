"""The WebSocket transport of a session: the handshake, client frames, the close handshake.

Authorisation runs after the handshake (``check_origin`` lets everything
through) so a refusal can carry the contract's close code; what happens from
there is the session's (:mod:`ws_gateway.handlers.session`), shared with the
SSE streams. Bytes on the wire are :mod:`ws_gateway.transport`'s business;
holding frames during a routing batch is the consumer's
(:class:`~ws_gateway.consumer.WriteBatch`).

Invariant: every inbound frame is charged to the socket's rate limit before it
is handled, and a socket is written to only through its transport.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import tornado.websocket

from replyx.addresses import client_address
from replyx.protocol import CloseCode, FrameType
from ws_gateway.frames import PONG_FRAME
from ws_gateway.handlers.session import Refused, Session, parse_dialog_id
from ws_gateway.transport import FrameLimitedProtocol

__all__ = ["DialogSocket", "Refused", "parse_dialog_id"]

log = logging.getLogger("ws_gateway.sockets")


class DialogSocket(Session, tornado.websocket.WebSocketHandler):
    """A session over a WebSocket. Kinds combine this with their :class:`Session` subclass."""

    transport_name = "ws"

    # -- handshake -----------------------------------------------------------

    def check_origin(self, origin: str) -> bool:
        # Origins are checked in start(), after the handshake, so the client gets a close code.
        return True

    def get_compression_options(self) -> dict[str, Any] | None:
        # Frames are pre-encoded once for all sockets; per-socket deflate would undo that.
        return None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if not isinstance(protocol, tornado.websocket.WebSocketProtocol13):
            return protocol
        settings = self.parts.settings
        return FrameLimitedProtocol(
            self, protocol.params, self.allow_frame,
            fragment_timeout=settings.fragment_timeout, pong_deadline=settings.slow_close_grace,
            on_stalled=self._stalled,
        )

    def _stalled(self, detail: str) -> None:
        """The client reads nothing we write (no echo of our ping): the slow-client policy."""
        if self.transport is not None:
            self.transport.too_slow(detail)
        else:
            self._close(CloseCode.TOO_SLOW, "client too slow, resume with since")

    async def open(self, raw_id: str = "") -> None:
        assert self.ws_connection is not None and self.ws_connection.stream is not None
        self.make_transport(self.ws_connection.stream)
        await self.start(raw_id)

    # -- the connection --------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        conn = self.ws_connection
        return not self._closing and conn is not None and not conn.is_closing()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._closing = True
        if self._server_close_code is None:
            self._server_close_code = code
        if self.transport is not None:
            self.transport.close()
        super().close(code, reason)

    def client_close_code(self) -> int | None:
        return self.close_code

    # -- client frames ------------------------------------------------------------

    def allow_frame(self) -> bool:
        """Charge one inbound frame; over the limit, close with 1008 and return False."""
        if self._closing or self.parts.limiter.allow_frame(self):
            # Frames still in flight while a close handshake runs are not charged.
            return True
        self.parts.stats.refused[str(CloseCode.POLICY)] += 1
        if self.parts.limiter.may_log(self):
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
        if isinstance(data, dict) and data.get("type") == FrameType.PING and self._joined:
            self.write_frame(PONG_FRAME)

    def on_close(self) -> None:
        self.ended()
