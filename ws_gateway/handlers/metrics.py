"""``/metrics``: the gateway's Prometheus text (see :mod:`ws_gateway.metrics`).

Invariant: as debug, it answers a direct loopback peer without a token and
anyone else only with an operator JWT.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ws_gateway.handlers.http import GatewayHandler


class MetricsHandler(GatewayHandler):
    def get(self) -> None:
        self.viewer()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.parts.registry))
