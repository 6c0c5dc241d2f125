"""Operator (admin panel) endpoints: the operator's dialogs, their history, replies, typing."""

from __future__ import annotations

from backend import store, workspace
from backend.api.base import ApiError, ApiHandler, parse_id
from backend.models import Dialog

MAX_PAGE = 1000


class OperatorHandler(ApiHandler):
    async def own_dialog(self, raw_id: str) -> Dialog:
        user_id = self.operator_id()
        dialog_id = parse_id(raw_id)
        async with self.db.session() as session:
            dialog = await store.operator_dialog(session, user_id, dialog_id)
        if dialog is None:
            raise ApiError(404, "dialog not found")
        return dialog


class DialogsHandler(OperatorHandler):
    """``GET /api/dialogs?before=<activity>&limit=N``: the inbox's older pages."""

    async def get(self) -> None:
        user_id = self.operator_id()
        before = self.query_int("before", 0) or None
        limit = self.query_int("limit", 100, minimum=1, maximum=MAX_PAGE)
        async with self.db.session() as session:
            page = await workspace.dialog_page(session, user_id, before, limit)
        self.finish(b'{"dialogs":[%s],"total":%d,"next_before":%s}' % (
            ",".join(page.dialogs).encode(), page.total,
            b"null" if page.next_before is None else str(page.next_before).encode(),
        ))


class ReadHandler(OperatorHandler):
    """``POST /api/dialogs/{id}/read {"seq"}``: the operators have read up to ``seq``."""

    async def post(self, raw_id: str) -> None:
        await self.mark_read(store.Principal.operator(self.operator_id()), raw_id, "operator")


class MessagesHandler(OperatorHandler):
    async def get(self, raw_id: str) -> None:
        dialog = await self.own_dialog(raw_id)
        since = self.query_int("since", 0)
        limit = self.query_int("limit", 500, minimum=1, maximum=MAX_PAGE)
        async with self.db.session() as session:
            rendered = await store.messages_since(session, dialog.id, since, limit)
        body = b'{"dialog_id":%d,"messages":[%s]}' % (
            dialog.id, ",".join(rendered).encode()
        )
        self.finish(body)

    async def post(self, raw_id: str) -> None:
        principal = store.Principal.operator(self.operator_id())
        text = self.message_text(self.json_body())
        await self.post_message(principal, raw_id, "operator", text)


class TypingHandler(OperatorHandler):
    async def post(self, raw_id: str) -> None:
        await self.post_typing(store.Principal.operator(self.operator_id()), raw_id, "operator")
