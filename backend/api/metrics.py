"""``GET /metrics``: the backend's request metrics, summed over all gunicorn workers.

Same rule as the gateway's debug endpoints: a direct loopback peer (no
``X-Forwarded-For`` / ``X-Real-IP``, so not through nginx) reads it without a
token; any other caller needs an operator JWT.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from backend import metrics
from backend.api.base import ApiHandler
from replyx.addresses import is_direct_loopback


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        if not is_direct_loopback(self.request):
            self.operator_id()  # 401 without a valid operator token
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(metrics.exposition(self.metrics_dir))
