"""``/ws/widget/dialogs/{id}?assistant_id=A&guest_token=G[&parent_origin=O]`` (and ``/sse/…``).

Invariant: the guest token names its dialog; ``assistant_id`` is only
cross-checked, never trusted alone. The page origin (``Origin``, or
``parent_origin`` inside our own iframe) must be one of the assistant's domains.
"""

from __future__ import annotations

from replyx.origins import effective_origin, origin_allowed
from replyx.protocol import CloseCode, SocketKind
from ws_gateway.handlers.base import DialogSocket
from ws_gateway.handlers.session import Refused, Session
from ws_gateway.handlers.stream import DialogStream
from ws_gateway.router import REPLAY_PAGE
from ws_gateway.store import Opening


class Widget(Session):
    kind = SocketKind.WIDGET

    async def authorize(self, dialog_id: int, since: int | None) -> Opening:
        token = self.get_query_argument("guest_token", None)
        if not token:
            raise Refused(CloseCode.UNAUTHORIZED, "guest_token is required")
        dialog = await self.parts.store.guest_opening(
            token, dialog_id, since, REPLAY_PAGE, self.parts.router.page_bytes)
        if dialog is None:
            raise Refused(CloseCode.UNAUTHORIZED, "invalid guest token")
        opening = dialog.opening
        if opening is None or not self._assistant_matches(dialog.assistant_id):
            raise Refused(CloseCode.NOT_FOUND, "dialog not found")
        origin = self.page_origin()
        parent_origin = self.get_query_argument("parent_origin", None)
        widget_origin = self.parts.settings.widget_origin
        if not origin_allowed(origin, parent_origin, dialog.domains, widget_origin):
            checked = effective_origin(origin, parent_origin, widget_origin)
            raise Refused(
                CloseCode.FORBIDDEN_ORIGIN,
                "origin not allowed for this assistant",
                f"assistant_id={dialog.assistant_id} origin={(origin or '-')[:200]}"
                f" checked={checked or '-'}",
            )
        return opening

    def _assistant_matches(self, assistant_id: int) -> bool:
        raw = self.get_query_argument("assistant_id", None)
        return raw is None or raw == str(assistant_id)


class WidgetSocket(Widget, DialogSocket):
    pass


class WidgetStream(Widget, DialogStream):
    pass
