"""The HTTP half of ``replyx check``: both /health endpoints, nginx's /api/ and /ws/ routes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from replyx_ops.check.base import CheckFailed, Probe, ms, short, short_body


class HttpChecks(Probe):

    def _health(self, program: str, base: str, why_503: str) -> bytes:
        """The body of ``base/health`` when it answers 200; else a failure naming the fix."""
        spec = f"gateway:{program}" if program.startswith("gateway-") else program
        hint = f"`replyx ctl start {spec}`; its log: {self.log_dir}/{program}.log"
        try:
            status, _, body = self._get(base + "/health")
        except OSError as exc:
            raise CheckFailed(f"{base}/health: {short(exc)}", hint) from None
        if status != 200:
            raise CheckFailed(f"{base}/health answered {status} {short_body(body)}",
                              f"503: {why_503}; " + hint)
        return body

    def check_backend_health(self) -> str:
        body = self._health("backend", self.backend, "the backend cannot reach Postgres")
        return f"{self.backend}/health 200 {short_body(body)}"

    def check_gateway_health(self, name: str = "gateway", base: str | None = None) -> str:
        base = base or self.gateway
        body = self._health(name, base, "the LISTEN connection is down or catching up")
        health = orjson.loads(body)
        return (f"{base}/health 200: listener {health.get('listener')},"
                f" {health.get('sockets')} socket(s),"
                f" notification lag {ms(health.get('notification_lag_ms'))}")

    def check_nginx_api(self) -> str:
        url = self.proxy + "/api/dialogs"
        try:
            status, headers, _ = self._get(url)
        except OSError as exc:
            raise CheckFailed(
                f"{url}: {short(exc)}",
                f"`replyx ctl start nginx`; its log: {self.log_dir}/nginx.log",
            ) from None
        worker = headers.get("X-Replyx-Worker")
        if status in (502, 504):
            raise CheckFailed(f"{url}: nginx answered {status}: the backend behind it is down",
                              "`replyx ctl start backend`")
        if worker is None or status != 401:
            raise CheckFailed(
                f"{url}: {status} without the backend's X-Replyx-Worker header",
                "conf/nginx.conf: `location /api/ { proxy_pass http://replyx_backend; }`",
            )
        return f"GET /api/dialogs → backend worker {worker} (401 without a token, as it should)"

    def check_nginx_ws(self) -> str:
        url = self.proxy.replace("http://", "ws://", 1) + "/ws/health"
        try:
            frame = asyncio.run(self._ws_frame(url))
        except Exception as exc:
            code = getattr(exc, "code", None)
            if code in (502, 504):
                why, hint = (f"nginx answered {code}: the gateway behind it is down",
                             "`replyx ctl start gateway`")
            elif code in (400, 426):
                why, hint = (f"the gateway refused the upgrade ({code}): Upgrade headers lost",
                             "conf/nginx.conf: proxy_http_version 1.1 and"
                             " proxy_set_header Upgrade/Connection in location /ws/")
            else:
                why, hint = (short(exc),
                             f"`replyx ctl start nginx`; its log: {self.log_dir}/nginx.log")
            raise CheckFailed(f"{url}: {why}", hint) from None
        if frame.get("type") != "health":
            raise CheckFailed(f"{url}: unexpected first frame {frame!r}",
                              "conf/nginx.conf: /ws/ must proxy to the gateway")
        return f"WebSocket upgrade on /ws/health → gateway, status {frame.get('status')}"

    async def _ws_frame(self, url: str) -> dict[str, Any]:
        request = HTTPRequest(url, connect_timeout=self.timeout, request_timeout=self.timeout)
        conn = await websocket_connect(request, ping_interval=None)
        try:
            raw = await asyncio.wait_for(conn.read_message(), self.timeout)
        finally:
            conn.close()
        if raw is None:
            raise CheckFailed("closed without a frame")
        frame = orjson.loads(raw)
        if not isinstance(frame, dict):
            raise CheckFailed(f"a first frame that is not a JSON object: {frame!r:.80}")
        return frame
