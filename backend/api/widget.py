"""Widget endpoints: anonymous visitors on customer sites, authorised by origin then guest token.

Browsers call these cross-origin from the embedding page, so they answer CORS
preflights. No cookies are involved: the guest token is a bearer credential.
"""

from __future__ import annotations

import logging

from backend import store
from backend.api.base import ApiError, ApiHandler
from replyx.origins import effective_origin, origin_allowed

log = logging.getLogger("backend.widget")


class WidgetHandler(ApiHandler):
    def set_default_headers(self) -> None:
        super().set_default_headers()
        origin = self.request.headers.get("Origin")
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.set_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.set_header("Access-Control-Max-Age", "600")
            self.set_header("Vary", "Origin")

    def options(self, *args: str) -> None:
        self.set_status(204)
        self.finish()

    def guest(self) -> store.Principal:
        token = self.credential("guest_token")
        if not token:
            raise ApiError(401, "guest_token is required")
        return store.Principal.guest(token)


class WidgetDialogsHandler(WidgetHandler):
    async def post(self) -> None:
        body = self.json_body()
        assistant_id = self.field_int(body, "assistant_id")
        parent_origin = self.field_str(body, "parent_origin", required=False, max_chars=300)
        assert assistant_id is not None
        async with self.db.session() as session:
            assistant = await store.assistant_by_id(session, assistant_id)
            if assistant is None:
                raise ApiError(404, "assistant not found")
            origin = self.request.headers.get("Origin")
            if not origin_allowed(
                origin, parent_origin, assistant.domains, self.config.widget_origin
            ):
                log.warning(
                    "[Widget] WEBSOCKET_4003_ERROR refused widget dialog: assistant_id=%d"
                    " origin=%s effective=%s",
                    assistant_id, origin or "-",
                    effective_origin(origin, parent_origin, self.config.widget_origin) or "-",
                )
                raise ApiError(403, "origin not allowed for this assistant")
            created = await store.create_dialog(session, assistant.id, "widget")
        self.write_json({"dialog_id": created.dialog_id, "guest_token": created.guest_token}, 201)


class WidgetMessagesHandler(WidgetHandler):
    async def post(self, raw_id: str) -> None:
        principal = self.guest()
        text = self.message_text(self.json_body())
        await self.post_message(principal, raw_id, "visitor", text)


class WidgetTypingHandler(WidgetHandler):
    async def post(self, raw_id: str) -> None:
        await self.post_typing(self.guest(), raw_id, "visitor")
