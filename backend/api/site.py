"""Site-integration endpoints, authorised by the assistant's site token."""

from __future__ import annotations

from backend import store
from backend.api.base import ApiError, ApiHandler, parse_id
from backend.models import Assistant, Dialog

# A site integration speaks for the visitor by default, or as the assistant / system.
SITE_SENDERS = ("visitor", "assistant", "system")


class SiteHandler(ApiHandler):
    async def site_assistant(self) -> Assistant:
        token = self.bearer_or_query("site_token")
        if not token:
            raise ApiError(401, "site_token is required")
        async with self.db.session() as session:
            assistant = await store.assistant_by_site_token(session, token)
        if assistant is None:
            raise ApiError(401, "invalid site token")
        return assistant

    async def site_dialog(self, raw_id: str) -> Dialog:
        assistant = await self.site_assistant()
        dialog_id = parse_id(raw_id)
        async with self.db.session() as session:
            dialog = await store.assistant_dialog(session, assistant.id, dialog_id)
        if dialog is None:
            raise ApiError(404, "dialog not found")
        return dialog


class SiteDialogsHandler(SiteHandler):
    async def post(self) -> None:
        assistant = await self.site_assistant()
        async with self.db.session() as session:
            created = await store.create_dialog(session, assistant.id, "site")
        self.write_json({"dialog_id": created.dialog_id}, 201)


class SiteMessagesHandler(SiteHandler):
    async def post(self, raw_id: str) -> None:
        dialog = await self.site_dialog(raw_id)
        body = self.json_body()
        text = self.message_text(body)
        sender = self.field_str(body, "sender", required=False) or "visitor"
        if sender not in SITE_SENDERS:
            raise ApiError(400, f"sender must be one of {', '.join(SITE_SENDERS)}")
        async with self.db.session() as session:
            rendered = await store.add_message(session, dialog.id, sender, text)
        self.write_json_text(rendered, 201)


class SiteTypingHandler(SiteHandler):
    async def post(self, raw_id: str) -> None:
        dialog = await self.site_dialog(raw_id)
        async with self.db.session() as session:
            await store.notify_typing(session, dialog.id, "visitor")
        self.set_status(204)
        self.finish()
