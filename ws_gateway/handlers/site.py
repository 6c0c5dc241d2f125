"""``/ws/site/dialogs/{id}?site_token=T`` (and ``/sse/…``): a site integration.

Invariant: a site token reads only the dialogs of its own assistant (4004 otherwise).
"""

from __future__ import annotations

from replyx.protocol import CloseCode, SocketKind
from ws_gateway.handlers.base import DialogSocket
from ws_gateway.handlers.session import Refused, Session
from ws_gateway.handlers.stream import DialogStream
from ws_gateway.router import REPLAY_PAGE
from ws_gateway.store import Opening


class Site(Session):
    kind = SocketKind.SITE

    async def authorize(self, dialog_id: int, since: int | None) -> Opening:
        token = self.get_query_argument("site_token", None)
        if not token:
            raise Refused(CloseCode.UNAUTHORIZED, "site_token is required")
        valid, opening = await self.parts.store.site_opening(
            token, dialog_id, since, REPLAY_PAGE, self.parts.router.page_bytes)
        if not valid:
            raise Refused(CloseCode.UNAUTHORIZED, "invalid site token")
        if opening is None:
            raise Refused(CloseCode.NOT_FOUND, "dialog not found")
        return opening


class SiteSocket(Site, DialogSocket):
    pass


class SiteStream(Site, DialogStream):
    pass
