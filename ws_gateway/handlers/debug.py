"""The gateway's HTTP side: ``/health``, ``/api/debug/websocket/{status,sync}``, ``/metrics``,
and ``/ws/health``, a socket that says how the gateway is and closes (for checks through nginx).

Debug and metrics answer a direct loopback peer without a token. A request
that came through a proxy (it carries ``X-Forwarded-For`` or ``X-Real-IP``) or
from another address needs an operator JWT, and then sees only that operator's
dialogs.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson
import tornado.web
import tornado.websocket
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replyx import security
from replyx.addresses import is_direct_loopback
from replyx.logs import RedactedRequestLogging
from replyx.protocol import SocketKind, positive_id
from ws_gateway.handlers.admin import bearer

if TYPE_CHECKING:
    from ws_gateway.app import Gateway

log = logging.getLogger("ws_gateway.debug")

KINDS = tuple(SocketKind)
MAX_DIALOGS_LISTED = 1000


class GatewayHTTPHandler(RedactedRequestLogging, tornado.web.RequestHandler):
    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) if status_code < 500 else None
        if exc is not None and self.gateway.store.is_unavailable(exc):
            self.set_status(503)
            message = "database unavailable, retry shortly"
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(orjson.dumps({"error": message or self._reason}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if value is not None and self.gateway.store.is_unavailable(value):
            log.warning("%s: database unavailable (%s)", self._request_summary(),
                        type(value).__name__)
            return
        super().log_exception(typ, value, tb)

    def viewer(self) -> int | None:
        """``None`` for a trusted local caller, else the operator's user id (or 401)."""
        if is_direct_loopback(self.request):
            return None
        token = bearer(self.request.headers) or self.get_query_argument("token", None)
        try:
            return security.verify_operator_token(token, self.gateway.jwt_secret).user_id
        except security.InvalidTokenError:
            raise tornado.web.HTTPError(401, "an operator token is required") from None


class NotFoundHandler(GatewayHTTPHandler):
    """JSON 404 for every path no route matches."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class HealthHandler(GatewayHTTPHandler):
    def get(self) -> None:
        health = self.gateway.health()
        self.write_json(health, 200 if health["status"] == "ok" else 503)


class StatusHandler(GatewayHTTPHandler):
    async def get(self) -> None:
        user_id = self.viewer()
        router = self.gateway.router
        dialog_ids = list(router.channels)
        if user_id is not None:
            allowed = await self.gateway.store.operator_dialog_ids(user_id, dialog_ids)
            dialog_ids = [d for d in dialog_ids if d in allowed]
        totals: Counter[str] = Counter()
        dialogs: dict[int, dict[str, int]] = {}
        for dialog_id in dialog_ids:
            kinds = Counter(sub.kind for sub in router.sockets_of(dialog_id))
            totals.update(kinds)
            if len(dialogs) < MAX_DIALOGS_LISTED:
                dialogs[dialog_id] = {kind: kinds.get(kind, 0) for kind in KINDS}
        self.write_json(
            {
                "connections": {"total": sum(totals.values()), **{k: totals[k] for k in KINDS}},
                "dialogs": dialogs,
                "dialogs_total": len(dialog_ids),
                "listener": self.gateway.listener_state(),
            }
        )


class SyncHandler(GatewayHTTPHandler):
    async def get(self) -> None:
        user_id = self.viewer()
        dialog_id = positive_id(self.get_query_argument("dialog_id", ""))
        if dialog_id is None:
            raise tornado.web.HTTPError(400, "dialog_id must be a positive integer")
        store = self.gateway.store
        if user_id is not None and not await store.operator_dialog_ids(user_id, [dialog_id]):
            raise tornado.web.HTTPError(404, "dialog not found")
        db_last_seq = await store.last_seq(dialog_id)
        subs = list(self.gateway.router.sockets_of(dialog_id))
        kinds = Counter(sub.kind for sub in subs)
        delivered = [sub.sent_seq for sub in subs]
        catching_up = sum(1 for sub in subs if sub.buffer is not None)
        self.write_json(
            {
                "dialog_id": dialog_id,
                "sockets": {kind: kinds.get(kind, 0) for kind in KINDS},
                "db_last_seq": db_last_seq,
                "delivered_last_seq": min(delivered) if delivered else None,
                "delivered_max_seq": max(delivered) if delivered else None,
                "catching_up": catching_up,
                "in_sync": catching_up == 0 and all(seq == db_last_seq for seq in delivered),
                "listener": self.gateway.listener.state,
            }
        )


class MetricsHandler(GatewayHTTPHandler):
    def get(self) -> None:
        self.viewer()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.gateway.registry))


class HealthSocket(tornado.websocket.WebSocketHandler):
    """``/ws/health``: one ``{"type":"health","status":…}`` frame, then close 1000.

    ``replyx check`` opens it through nginx: a real Upgrade on the ``/ws/`` route that
    reaches the gateway, without a credential and without counting as a refused socket.
    """

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self) -> None:
        status = self.gateway.health()["status"]
        self.write_message(orjson.dumps({"type": "health", "status": status}).decode())
        self.close(1000, "health")
