"""What the gateway's HTTP handlers share: their parts, database errors, who may look.

Errors are translated by :class:`replyx.web.JsonHandler`, as in the backend;
here only which errors of asyncpg mean "the database cannot be reached" (503).
Debug and metrics answer a direct loopback peer without a token. A request
that came through a proxy (it carries ``X-Forwarded-For`` or ``X-Real-IP``) or
from another address needs an operator JWT (:meth:`GatewayHandler.viewer`),
and then sees only that operator's dialogs.
"""

from __future__ import annotations

from replyx import security
from replyx.addresses import is_direct_loopback
from replyx.web import ApiError, JsonHandler
from ws_gateway.parts import Parts
from ws_gateway.store import GatewayStore


class GatewayHandler(JsonHandler):
    def initialize(self, parts: Parts) -> None:
        self.parts = parts

    def is_unavailable(self, exc: BaseException) -> bool:
        return GatewayStore.is_unavailable(exc)

    def viewer(self) -> int | None:
        """``None`` for a trusted local caller, else the operator's user id (or 401)."""
        if is_direct_loopback(self.request):
            return None
        try:
            return security.verify_operator_token(
                self.credential("token"), self.parts.jwt_secret,
                max_lifetime=self.parts.settings.jwt_max_lifetime,
            ).user_id
        except security.InvalidTokenError:
            raise ApiError(401, "an operator token is required") from None


class NotFoundHandler(GatewayHandler):
    """JSON 404 for every path no route matches."""

    def prepare(self) -> None:
        raise ApiError(404, "not found")
