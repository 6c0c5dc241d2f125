"""``/ws/site/dialogs/{id}?site_token=T``: a site integration, for its assistant's dialogs."""

from __future__ import annotations

from ws_gateway.handlers.base import CLOSE_NOT_FOUND, CLOSE_UNAUTHORIZED, DialogSocket, Refused


class SiteSocket(DialogSocket):
    kind = "site"
    tag = "[Site]"

    async def authorize(self, dialog_id: int) -> None:
        token = self.get_query_argument("site_token", None)
        if not token:
            raise Refused(CLOSE_UNAUTHORIZED, "site_token is required")
        valid, owned = await self.gateway.store.site_dialog(token, dialog_id)
        if not valid:
            raise Refused(CLOSE_UNAUTHORIZED, "invalid site token")
        if not owned:
            raise Refused(CLOSE_NOT_FOUND, "dialog not found")
