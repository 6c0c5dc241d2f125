"""``/health`` and ``/ws/health``: whether this gateway delivers right now.

Invariant: "ok" means the LISTEN connection is up, no dialog is still catching
up after a reconnect and the gateway is not stopping; anything else is 503
(and ``"unavailable"`` on the socket). Health holds no dialog data, so it is
public.
"""

from __future__ import annotations

from typing import Any

import orjson
import tornado.websocket

from replyx.gateways import gateway_name
from replyx.protocol import FrameType
from ws_gateway.handlers.http import GatewayHandler
from ws_gateway.parts import Parts


def health(parts: Parts) -> dict[str, Any]:
    router = parts.router
    ok = parts.listener.is_up and router.resyncing == 0 and not parts.stopping.is_set()
    lag = parts.stats.last_lag
    return {
        "status": "ok" if ok else "unavailable",
        "gateway": gateway_name(parts.settings),
        "listener": parts.listener.state,
        "resyncing_dialogs": router.resyncing,
        "notification_lag_ms": round(lag * 1000, 2) if lag is not None else None,
        "queue": parts.consumer.queue.qsize(),
        "sockets": router.socket_count(),
    }


class HealthHandler(GatewayHandler):
    def get(self) -> None:
        report = health(self.parts)
        self.write_json(report, 200 if report["status"] == "ok" else 503)


class HealthSocket(tornado.websocket.WebSocketHandler):
    """``/ws/health``: one ``{"type":"health","status":…}`` frame, then close 1000.

    ``replyx check`` opens it through nginx: a real Upgrade on the ``/ws/`` route that
    reaches the gateway, without a credential and without counting as a refused socket.
    """

    def initialize(self, parts: Parts) -> None:
        self.parts = parts

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self) -> None:
        status = health(self.parts)["status"]
        self.write_message(orjson.dumps({"type": FrameType.HEALTH, "status": status}).decode())
        self.close(1000, "health")
