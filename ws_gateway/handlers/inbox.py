"""``/ws/inbox?token=JWT``: an operator's workspace, live (see :mod:`ws_gateway.workspace`).

The same transport, limits and close codes as a dialog socket; no dialog and no
``since``: every (re)connect starts from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replyx import security
from replyx.protocol import CloseCode, SocketKind
from replyx.web import bearer
from ws_gateway.events import DialogEvent
from ws_gateway.handlers.base import DialogSocket, Refused
from ws_gateway.transport import Transport

log = logging.getLogger("ws_gateway.sockets")


class InboxSocket(DialogSocket):
    kind = SocketKind.INBOX

    async def _handshake(self) -> None:  # type: ignore[override]
        parts = self.parts
        assert self.ws_connection is not None and self.ws_connection.stream is not None
        settings = parts.settings
        self.transport = transport = Transport(
            self, self.ws_connection.stream, parts.stats,
            buffer_limit=settings.socket_buffer_limit, slow_grace=settings.slow_close_grace,
        )
        self.user_id = 0
        self.assistants: frozenset[int] = frozenset()
        self.inbox_buffer: list[tuple[int, DialogEvent]] | None = None
        parts.sockets.add(self)
        if parts.stopping.is_set():
            self._close(CloseCode.RESTARTING, "gateway restarting, reconnect")
            return
        if not self._admitted():
            return
        token = self.get_query_argument("token", None) or bearer(self.request.headers)
        try:
            claims = security.verify_operator_token(
                token, parts.jwt_secret, max_lifetime=settings.jwt_max_lifetime)
        except security.InvalidTokenError:
            self._refuse(Refused(CloseCode.UNAUTHORIZED, "missing, invalid or expired token"))
            return
        self.user_id = claims.user_id
        self.expire_at(claims.expires_at)
        transport.limit()
        self._joined = True
        try:
            async with asyncio.timeout(settings.join_timeout):
                await parts.workspace.join(self)
        except Exception as exc:
            parts.workspace.remove(self)
            if not (isinstance(exc, TimeoutError) or parts.store.is_unavailable(exc)):
                raise
            self._refuse(Refused(CloseCode.TRY_AGAIN, "database unavailable, try again"))
            return
        if self.is_open:
            log.info("%s connected user_id=%d assistants=%d peer=%s", self.kind.tag,
                     self.user_id, len(self.assistants), self.request.remote_ip)

    def on_close(self) -> None:
        if self._joined:
            self._joined = False  # the base class logs dialog sockets; this one logs itself
            code = self._server_close_code or self.close_code
            log.info("%s disconnected user_id=%d code=%s after %.1fs", self.kind.tag,
                     self.user_id, code if code is not None else "-",
                     time.monotonic() - self._opened_at)
        try:
            self.parts.workspace.remove(self)
        finally:
            super().on_close()  # the slot and the socket set, whatever happened above
