"""What a client connection is, whatever carries it: authorise, join the router, log, close.

A *session* is one subscriber of one dialog (or one inbox) over one transport:
a WebSocket (:mod:`ws_gateway.handlers.base`) or a server-sent event stream
(:mod:`ws_gateway.handlers.stream`). Both write whole frames through the same
:class:`~ws_gateway.transport.Transport` (buffer limit, 4008 policy,
``drained()``), so the router, the workspace and presence never ask which one
they hold. Each kind (admin, widget, site, inbox) is a subclass of
:class:`Session` holding its :meth:`Session.authorize`; the socket and the
stream of a kind combine it with their transport, so both run the one
authorisation code path.

Authorisation refuses with the contract's close code: 4001 bad token, 4003
origin, 4004 dialog not found or not yours, 4400 bad ``since``, 1013 the
database did not answer within ``join_timeout``.

Invariant: a session is registered in the router before its one handshake query
(see ``Router.register``), written to only once authorised, and taken out of
the router, the limiter and presence exactly once, when its connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, ClassVar

import orjson
import tornado.web
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
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
from ws_gateway.frames import text_frame
from ws_gateway.limits import Lease
from ws_gateway.parts import Parts
from ws_gateway.presence import PresenceSlot
from ws_gateway.replay import Page
from ws_gateway.store import Opening
from ws_gateway.transport import Transport

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


class Session(RedactedRequestLogging, tornado.web.RequestHandler):
    """One subscriber. Kinds implement :meth:`authorize`; transports the connection hooks."""

    kind: ClassVar[SocketKind]
    #: ``ws`` or ``sse``: named in the connect/disconnect lines, metrics and debug status.
    transport_name: ClassVar[str]

    if TYPE_CHECKING:
        # Provided by the transport's class (WebSocketHandler's, or the stream's own).
        def close(self, code: int | None = None, reason: str | None = None) -> None: ...

        @property
        def is_open(self) -> bool: ...

    def initialize(self, parts: Parts) -> None:
        self.parts = parts
        self._batch = parts.batch
        self.dialog_id = 0
        self.sent_seq = 0
        self.buffer: list[tuple[int, int, bytes]] | None = None
        # The write path; made once the connection has its stream.
        self.transport: Transport | None = None
        self._joined = False
        self._closing = False
        self._ended = False
        self._server_close_code: int | None = None
        self._expiry: object | None = None
        self._opened_at = time.monotonic()
        self.assistant_id = 0  # the dialog's assistant, known once authorised
        self._read_seqs = (0, 0)
        self.presence = PresenceSlot()
        self._watching = False

    def make_transport(self, stream: IOStream) -> Transport:
        settings = self.parts.settings
        self.transport = Transport(
            self, stream, self.parts.stats,
            buffer_limit=settings.socket_buffer_limit, slow_grace=settings.slow_close_grace,
        )
        return self.transport

    # -- authorisation ---------------------------------------------------------------

    async def authorize(self, dialog_id: int, since: int | None) -> Opening:
        """Raise :class:`Refused` unless this request may read ``dialog_id``.

        One query (one round trip) authorises the session and returns its opening:
        the dialog's last seq and the first replay page after ``since``.
        """
        raise NotImplementedError

    def page_origin(self) -> str | None:
        """The origin of the page that opened this connection (the widget's origin rule)."""
        return self.request.headers.get("Origin")

    def admitted(self, restarting_reason: str) -> bool:
        """Count the session and its address; False (and closed) when it may not start.

        The per-address handshake rate first (no database query is made for a refused
        one), then the per-address socket cap; a refusal closes with 1008.
        """
        parts = self.parts
        if self._gone():
            return False  # the client already left: nothing to count, nothing to release
        parts.sockets.add(self)
        if parts.stopping.is_set():
            self._close(CloseCode.RESTARTING, restarting_reason)
            return False
        limiter = parts.limiter
        if not limiter.admit(self):
            # 1013, not 1008: clients behind one address (a NAT, a proxy) all reconnecting
            # after a gateway restart must back off and retry, not give up for good.
            self._refuse(Refused(CloseCode.TRY_AGAIN, "too many connection attempts, try again"))
            return False
        if not limiter.acquire(self):
            self._refuse(Refused(CloseCode.POLICY, "too many connections from this address"))
            return False
        return True

    async def start(self, raw_id: str = "") -> None:
        """The handshake; whatever fails in it ends in a close code, never a silent drop.

        Tornado aborts a connection whose ``open()`` raises without ever calling
        ``on_close``: the address's slot and the socket set would keep it for good.
        """
        try:
            await self._handshake(raw_id)
        except Exception as exc:
            self._handshake_failed(exc)

    async def _handshake(self, raw_id: str) -> None:
        """Authorise and register; the replay, ``ready`` and presence follow in :meth:`_join`."""
        parts = self.parts
        transport = self.transport
        assert transport is not None
        if not self.admitted("gateway restarting, resume with since"):
            return
        router = parts.router
        since: int | None = None
        lease: Lease | None = None
        try:
            # A WebSocket reads no client frame (pongs included) until open() returns: bound
            # the wait for the database well inside its ping timeout. The replay comes after
            # open() returns, under the slow-client policy (4008), not this timeout.
            async with asyncio.timeout(parts.settings.join_timeout):
                self.dialog_id = parse_dialog_id(raw_id)
                since = self._since()
                if since is not None:
                    # Room for the first page in the replay budget, before its query.
                    lease = await router.budget.acquire(router.page_bytes)
                # Register, then query: whatever commits after the query's snapshot is
                # routed into this session's buffer (see Router.register).
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
            "%s connected dialog_id=%d since=%s last_seq=%d peer=%s transport=%s",
            self.kind.tag, self.dialog_id, "-" if since is None else since, self.sent_seq,
            self.request.remote_ip, self.transport_name,
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
        """The client left, or we closed, while start() awaited (a method: it changes then)."""
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
            "%s%s refused dialog_id=%s code=%d reason=%s%s peer=%s transport=%s",
            self.kind.tag, marker, self.dialog_id or "-", refusal.code, refusal.reason,
            f" {refusal.detail}" if refusal.detail else "", client_address(self.request),
            self.transport_name,
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
            log.info("%s token expired dialog_id=%d transport=%s", self.kind.tag,
                     self.dialog_id, self.transport_name)
            self._close(CloseCode.UNAUTHORIZED, "token expired")

    # -- the router's side -----------------------------------------------------

    @property
    def is_finished(self) -> bool:
        """The connection is gone."""
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

    # -- the end -------------------------------------------------------------------

    def ended(self) -> None:
        """The connection is gone: leave presence, the router and the limiter (once)."""
        if self._ended:
            return
        self._ended = True
        if self._watching:
            self._watching = False
            self.parts.presence.unwatch(self)
        if self._expiry is not None:
            IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        self._closing = True
        # The transport points back at this session: dropping it leaves no cycle, so the
        # connection's objects are freed now, not by a garbage collection (gctune.py).
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        parts = self.parts
        parts.sockets.discard(self)
        parts.router.remove(self)
        parts.limiter.release(self)
        if self._joined:
            self.log_disconnected()

    def log_disconnected(self) -> None:
        code = self._server_close_code or self.client_close_code()
        log.info(
            "%s disconnected dialog_id=%d code=%s sent_seq=%d after %.1fs transport=%s",
            self.kind.tag, self.dialog_id, code if code is not None else "-", self.sent_seq,
            time.monotonic() - self._opened_at, self.transport_name,
        )

    def client_close_code(self) -> int | None:
        """The close code the client sent, when its transport has one."""
        return None
