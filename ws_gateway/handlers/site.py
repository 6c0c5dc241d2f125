"""``/ws/site/dialogs/{id}?site_token=T``: a site integration, for its assistant's dialogs."""

from __future__ import annotations

from replyx.protocol import CloseCode, SocketKind
from ws_gateway.handlers.base import DialogSocket, Refused


class SiteSocket(DialogSocket):
    kind = SocketKind.SITE

    async def authorize(self, dialog_id: int) -> None:
        token = self.get_query_argument("site_token", None)
        if not token:
            raise Refused(CloseCode.UNAUTHORIZED, "site_token is required")
        valid, owned = await self.parts.store.site_dialog(token, dialog_id)
        if not valid:
            raise Refused(CloseCode.UNAUTHORIZED, "invalid site token")
        if not owned:
            raise Refused(CloseCode.NOT_FOUND, "dialog not found")
