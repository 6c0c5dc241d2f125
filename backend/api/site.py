"""Site-integration endpoints, authorised by the assistant's site token.

Messages and typing events are counted per client address (not per site token:
the token is the site owner's server credential, like an operator's login).
"""

from __future__ import annotations

from backend import store
from backend.api.base import ApiError, ApiHandler
from replyx.protocol import Sender

# A site integration speaks for the visitor by default, or as the assistant / system.
SITE_SENDERS = (Sender.VISITOR, Sender.ASSISTANT, Sender.SYSTEM)


class SiteHandler(ApiHandler):
    def site_token(self) -> str:
        token = self.credential("site_token")
        if not token:
            raise ApiError(401, "site_token is required")
        return token


class SiteDialogsHandler(SiteHandler):
    async def post(self) -> None:
        token = self.site_token()
        async with self.db.session() as session:
            assistant = await store.assistant_by_site_token(session, token)
            if assistant is None:
                raise ApiError(401, "invalid site token")
            created = await store.create_dialog(session, assistant.id, "site")
        self.write_json({"dialog_id": created.dialog_id}, 201)


class SiteMessagesHandler(SiteHandler):
    async def post(self, raw_id: str) -> None:
        principal = store.Principal.site(self.site_token())
        await self.limit(self.write_buckets(principal))
        body = self.json_body()
        text = self.message_text(body)
        sender = self.field_str(body, "sender", required=False) or "visitor"
        if sender not in SITE_SENDERS:
            raise ApiError(400, f"sender must be one of {', '.join(SITE_SENDERS)}")
        await self.post_message(principal, raw_id, sender, text)


class SiteTypingHandler(SiteHandler):
    async def post(self, raw_id: str) -> None:
        principal = store.Principal.site(self.site_token())
        await self.limit(self.write_buckets(principal))
        await self.post_typing(principal, raw_id, "visitor")
