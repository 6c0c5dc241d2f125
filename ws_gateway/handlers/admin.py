"""``/ws/dialogs/{id}?token=JWT`` and ``/sse/dialogs/{id}?token=JWT``: the operator panel.

Invariant: an operator reads only dialogs of their assistants ("not yours" and
"not there" are the same 4004), and never past their JWT's expiry (4001 then).
"""

from __future__ import annotations

from replyx import security
from replyx.protocol import CloseCode, SocketKind
from replyx.web import bearer
from ws_gateway.handlers.base import DialogSocket
from ws_gateway.handlers.session import Refused, Session
from ws_gateway.handlers.stream import DialogStream
from ws_gateway.router import REPLAY_PAGE
from ws_gateway.store import Opening


class Admin(Session):
    kind = SocketKind.ADMIN
    #: Known once the token is verified; 0 for a session refused before that.
    user_id = 0

    async def authorize(self, dialog_id: int, since: int | None) -> Opening:
        token = self.get_query_argument("token", None) or bearer(self.request.headers)
        try:
            claims = security.verify_operator_token(
                token, self.parts.jwt_secret, max_lifetime=self.parts.settings.jwt_max_lifetime
            )
        except security.InvalidTokenError:
            raise Refused(CloseCode.UNAUTHORIZED, "missing, invalid or expired token") from None
        opening = await self.parts.store.admin_opening(
            dialog_id, claims.user_id, since, REPLAY_PAGE, self.parts.router.page_bytes
        )
        if opening is None:
            raise Refused(CloseCode.NOT_FOUND, "dialog not found", f"user_id={claims.user_id}")
        self.user_id = claims.user_id
        # Leaving the assistant's team closes this socket (4001), from the moment it is known.
        self.assistant_id = opening.assistant_id
        self.parts.workspace.add_operator_socket(self)
        self.expire_at(claims.expires_at)
        return opening

    def ended(self) -> None:
        try:
            self.parts.workspace.remove_operator_socket(self)
        finally:
            super().ended()  # the slot and the socket set, whatever happened above


class AdminSocket(Admin, DialogSocket):
    pass


class AdminStream(Admin, DialogStream):
    pass
