"""The handshake all three dialog sockets share: authorise, join the router, log, close.

Authorisation runs after the handshake (``check_origin`` lets everything
through) so a refusal can carry the contract's close code: 4001 bad token,
4003 origin, 4004 dialog not found or not yours, 4400 bad ``since``, 1013 the
database did not answer within ``join_timeout``.

Invariant: a socket is registered in the router before its one handshake query
(see ``Router.register``), written to only once authorised, and taken out of
the router on any refusal or close. Bytes on the wire are
:mod:`ws_gateway.transport`'s business; holding frames during a routing batch
is the consumer's (:class:`~ws_gateway.consumer.WriteBatch`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

import orjson
import tornado.websocket
from tornado.ioloop import IOLoop
from tornado.web import HTTPError

from replyx.addresses import client_address
from replyx.logs import RedactedRequestLogging
from replyx.protocol import (
    CloseCode,
    FrameType,
    ReadSide,
    SocketKind,
    non_negative_int,
    positive_id,
)
from ws_gateway.frames import PONG_FRAME, text_frame
from ws_gateway.limits import Lease
from ws_gateway.parts import Parts
from ws_gateway.presence import PresenceSlot
from ws_gateway.replay import Page
from ws_gateway.store import Opening
from ws_gateway.transport import FrameLimitedProtocol, Transport

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


class DialogSocket(RedactedRequestLogging, tornado.websocket.WebSocketHandler):
    """One client socket on one dialog. Subclasses implement :meth:`authorize`."""

    kind: ClassVar[SocketKind]

    def initialize(self, parts: Parts) -> None:
        self.parts = parts
        self._batch = parts.batch
        self.dialog_id = 0
        self.sent_seq = 0
        self.buffer: list[tuple[int, int, bytes]] | None = None
        # The write path; made in open(), once the connection has its stream.
        self.transport: Transport | None = None
        self._joined = False
        self._closing = False
        self._server_close_code: int | None = None
        self._expiry: object | None = None
        self._opened_at = time.monotonic()
        self.assistant_id = 0  # the dialog's assistant, known once authorised
        self._read_seqs = (0, 0)
        self.presence = PresenceSlot()
        self._watching = False

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

    async def authorize(self, dialog_id: int, since: int | None) -> Opening:
        """Raise :class:`Refused` unless this request may read ``dialog_id``.

        One query (one round trip) authorises the socket and returns its opening:
        the dialog's last seq and the first replay page after ``since``.
        """
        raise NotImplementedError

    async def open(self, *args: str) -> None:
        """The handshake; whatever fails in it ends in a close code, never a silent drop.

        Tornado aborts a connection whose ``open()`` raises without ever calling
        ``on_close``: the address's slot and the socket set would keep it for good.
        """
        try:
            await self._handshake(*args)
        except Exception as exc:
            self._handshake_failed(exc)

    async def _handshake(self, raw_id: str) -> None:
        parts = self.parts
        assert self.ws_connection is not None and self.ws_connection.stream is not None
        settings = parts.settings
        self.transport = transport = Transport(
            self, self.ws_connection.stream, parts.stats,
            buffer_limit=settings.socket_buffer_limit, slow_grace=settings.slow_close_grace,
        )
        parts.sockets.add(self)
        if parts.stopping.is_set():
            self._close(CloseCode.RESTARTING, "gateway restarting, resume with since")
            return
        if not self._admitted():
            return
        router = parts.router
        since: int | None = None
        lease: Lease | None = None
        try:
            # Tornado reads no client frame (pongs included) until open() returns: bound the
            # wait for the database well inside its ping timeout. The replay comes after
            # open() returns, under the slow-client policy (4008), not this timeout.
            async with asyncio.timeout(settings.join_timeout):
                self.dialog_id = parse_dialog_id(raw_id)
                since = self._since()
                if since is not None:
                    # Room for the first page in the replay budget, before its query.
                    lease = await router.budget.acquire(router.page_bytes)
                # Register, then query: whatever commits after the query's snapshot is
                # routed into this socket's buffer (see Router.register).
                mark = router.register(self)
                opening = await self.authorize(self.dialog_id, since)
                if lease is not None:
                    lease.shrink(sum(len(payload) for _, payload in opening.page))
                self.assistant_id = opening.assistant_id
                self._read_seqs = opening.read_seqs
                if since is not None and since > opening.last_seq:
                    # Seqs only ever grow: this client's state is from another database.
                    raise Refused(CloseCode.BAD_REQUEST, "since is ahead of the dialog")
        except BaseException as exc:
            router.remove(self)
            if lease is not None:
                lease.release()
            if isinstance(exc, Refused):
                self._refuse(exc)
                return
            if isinstance(exc, HTTPError):  # a query value Tornado cannot decode
                self._refuse(Refused(CloseCode.BAD_REQUEST, "malformed query string"))
                return
            if not (isinstance(exc, TimeoutError) or parts.store.is_unavailable(exc)):
                raise
            self._refuse(Refused(CloseCode.TRY_AGAIN, "database unavailable, try again"))
            return
        if self._gone():
            router.remove(self)  # the client left during the query
            if lease is not None:
                lease.release()
            return
        transport.limit()
        self._joined = True
        start = opening.last_seq if since is None else since
        router.spawn(self._join(start, Page(mark, opening.page, lease), since))

    async def _join(self, start: int, page: Page, since: int | None) -> None:
        """The replay and ``ready``, once open() has returned (so pongs and pings are read)."""
        try:
            await self.parts.router.join(self, start, page)
        finally:
            if page.lease is not None:
                page.lease.release()  # cancelled before the page was written
        if self._gone():
            # The client left while we were replaying.
            self.parts.router.remove(self)
            return
        log.info(
            "%s connected dialog_id=%d since=%s last_seq=%d peer=%s",
            self.kind.tag, self.dialog_id, "-" if since is None else since, self.sent_seq,
            self.request.remote_ip,
        )
        # The read state as of the handshake (later changes come as read frames), then
        # presence, right after ready.
        for side, seq in zip(ReadSide, self._read_seqs, strict=True):
            if seq:
                self.write_frame(text_frame(orjson.dumps(
                    {"type": FrameType.READ.value, "dialog_id": self.dialog_id,
                     "side": side.value, "seq": seq})))
        self._watching = True
        self.parts.presence.watch(self)

    def _admitted(self) -> bool:
        """The per-address handshake rate and socket cap; a refusal closes 1008."""
        limiter = self.parts.limiter
        if not limiter.admit(self):
            self._refuse(Refused(CloseCode.POLICY, "too many connection attempts"))
            return False
        if not limiter.acquire(self):
            self._refuse(Refused(CloseCode.POLICY, "too many connections from this address"))
            return False
        return True

    def _handshake_failed(self, exc: Exception) -> None:
        """Give back everything the handshake took, and close with a code."""
        parts = self.parts
        parts.router.remove(self)
        parts.limiter.release(self)
        if isinstance(exc, HTTPError):
            self._refuse(Refused(CloseCode.BAD_REQUEST, "malformed request"))
            return
        self.log_exception(type(exc), exc, exc.__traceback__)
        self._close(CloseCode.INTERNAL_ERROR, "internal error, try again")

    def _gone(self) -> bool:
        """The client left, or we closed, while open() awaited (a method: it changes then)."""
        return not self.is_open

    def _since(self) -> int | None:
        raw = self.get_query_argument("since", None)
        if raw is None or raw == "":
            return None
        since = non_negative_int(raw)
        if since is None:
            raise Refused(CloseCode.BAD_REQUEST, "since must be a non-negative integer")
        return since

    def _refuse(self, refusal: Refused) -> None:
        """Count every refusal, log at most one a second per address, close with its code.

        The address's slot comes back now, not when the client answers the close.
        """
        self.parts.limiter.release(self)
        self.parts.stats.refused[str(refusal.code)] += 1
        if not self.parts.limiter.may_log(self):
            self._close(refusal.code, refusal.reason)
            return
        marker = " WEBSOCKET_4003_ERROR" if refusal.code == CloseCode.FORBIDDEN_ORIGIN else ""
        log.warning(
            "%s%s refused dialog_id=%s code=%d reason=%s%s peer=%s",
            self.kind.tag, marker, self.dialog_id or "-", refusal.code, refusal.reason,
            f" {refusal.detail}" if refusal.detail else "", client_address(self.request),
        )
        self._close(refusal.code, refusal.reason)

    def expire_at(self, unix_time: float) -> None:
        """Close with 4001 when the credential expires (operator JWTs)."""
        if not self.is_open:
            return  # the client left during authorisation: no timer to hold it
        delay = max(0.0, unix_time - time.time())
        self._expiry = IOLoop.current().call_later(delay, self._expired)

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
        return self.transport is None or self.transport.finished

    def write_frame(self, frame: bytes) -> bool:
        """Write one pre-built frame, through the consumer's batch (which may hold it)."""
        transport = self.transport
        if transport is None:
            return False
        return self._batch.write(transport, frame)

    async def drained(self) -> None:
        transport = self.transport
        if transport is None or transport.closing:
            return
        self._batch.flush_one(transport)
        await transport.drained()

    def _close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._server_close_code = code
        self.close(code, reason)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._closing = True
        if self._server_close_code is None:
            self._server_close_code = code
        if self.transport is not None:
            self.transport.close()
        super().close(code, reason)

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
        if self._watching:
            self._watching = False
            self.parts.presence.unwatch(self)
        if self._expiry is not None:
            IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        parts = self.parts
        parts.sockets.discard(self)
        parts.router.remove(self)
        parts.limiter.release(self)
        if self._joined:
            code = self._server_close_code or self.close_code
            log.info(
                "%s disconnected dialog_id=%d code=%s sent_seq=%d after %.1fs",
                self.kind.tag, self.dialog_id, code if code is not None else "-", self.sent_seq,
                time.monotonic() - self._opened_at,
            )
