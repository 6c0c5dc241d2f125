"""``/ws/inbox?token=JWT`` and ``/sse/inbox?token=JWT``: an operator's workspace, live.

The same transports, limits and close codes as a dialog session (see
:mod:`ws_gateway.workspace`); no dialog and no ``since``: every (re)connect
starts from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replyx import security
from replyx.protocol import CloseCode, SocketKind
from replyx.web import bearer
from ws_gateway.events import DialogEvent
from ws_gateway.handlers.base import DialogSocket
from ws_gateway.handlers.session import Refused, Session
from ws_gateway.handlers.stream import DialogStream

log = logging.getLogger("ws_gateway.sockets")


class Inbox(Session):
    kind = SocketKind.INBOX

    async def _handshake(self, raw_id: str = "") -> None:
        parts = self.parts
        settings = parts.settings
        transport = self.transport
        assert transport is not None
        self.user_id = 0
        self.assistants: frozenset[int] = frozenset()
        self.inbox_buffer: list[tuple[int, DialogEvent]] | None = None
        if not self.admitted("gateway restarting, reconnect"):
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
            log.info("%s connected user_id=%d assistants=%d peer=%s transport=%s",
                     self.kind.tag, self.user_id, len(self.assistants),
                     self.request.remote_ip, self.transport_name)

    def ended(self) -> None:
        try:
            if hasattr(self, "assistants"):
                self.parts.workspace.remove(self)
        finally:
            super().ended()  # the slot and the socket set, whatever happened above

    def log_disconnected(self) -> None:
        code = self._server_close_code or self.client_close_code()
        log.info("%s disconnected user_id=%d code=%s after %.1fs transport=%s", self.kind.tag,
                 self.user_id, code if code is not None else "-",
                 time.monotonic() - self._opened_at, self.transport_name)


class InboxSocket(Inbox, DialogSocket):
    pass


class InboxStream(Inbox, DialogStream):
    pass
