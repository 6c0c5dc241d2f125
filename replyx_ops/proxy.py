"""``python -m replyx_ops.proxy``: nginx's routes in Python, for machines without nginx.

``replyx run`` starts it on ``NGINX_PORT`` when nginx is not installed (or with
``--no-nginx``), so the demo pages and every URL the banner prints work on a
bare machine with Python only. It routes as ``conf/nginx.conf`` does: ``/api/``
and ``/health`` to the backend, ``/ws/`` (WebSocket), ``/sse/`` (event streams,
unbuffered) and ``/demo/`` to the gateway, with ``X-Real-IP`` / ``X-Forwarded-For``
set, so the per-address limits and the loopback rule of the debug endpoints see the
real client. Anything else
is a JSON 404. It is a convenience for trying the product, not a production
front: it buffers bodies whole and has none of nginx's timeouts and limits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import tornado.web
import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.websocket import WebSocketClientConnection, websocket_connect

from replyx import logs
from replyx.gateways import gateway_ports
from replyx.settings import Settings
from replyx.web import ApiError, JsonHandler

log = logging.getLogger("replyx.proxy")

#: Headers that belong to one hop and are never passed on (RFC 9110, 7.6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length",
})
#: Request bodies over this are refused, as nginx's client_max_body_size 1m does.
MAX_BODY = 1024 * 1024


def forwarded_headers(handler: tornado.web.RequestHandler) -> dict[str, str]:
    """The request's headers for the upstream, with the client's address added."""
    headers = {k: v for k, v in handler.request.headers.get_all()
               if k.lower() not in HOP_BY_HOP and not k.lower().startswith("sec-websocket")}
    client = handler.request.remote_ip or ""
    previous = handler.request.headers.get("X-Forwarded-For")
    headers["X-Real-IP"] = client
    headers["X-Forwarded-For"] = f"{previous}, {client}" if previous else client
    headers["X-Forwarded-Proto"] = handler.request.protocol
    return headers


class HttpProxy(JsonHandler):
    """One HTTP request passed to ``upstream`` and its answer passed back."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, upstream: str) -> None:
        self.upstream = upstream

    def set_default_headers(self) -> None:
        """The upstream's headers are the answer's; only errors of our own are JSON."""

    async def forward(self, *args: str) -> None:
        body = self.request.body if self.request.method not in ("GET", "HEAD") else None
        request = HTTPRequest(
            self.upstream + self.request.uri, method=self.request.method,
            headers=forwarded_headers(self), body=body, follow_redirects=False,
            allow_nonstandard_methods=True, decompress_response=False,
            connect_timeout=5, request_timeout=60,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError as exc:
            log.warning("upstream %s: %s", self.upstream, exc)
            raise ApiError(502, "upstream unavailable") from None
        if response.code == 599:
            raise ApiError(502, "upstream unavailable")
        self.set_status(response.code, response.reason)
        for name, value in response.headers.get_all():
            if name.lower() not in HOP_BY_HOP:
                self.add_header(name, value)
        if response.body and self.request.method != "HEAD":
            self.write(response.body)
        await self.finish()

    get = head = post = put = patch = delete = options = forward


class StreamProxy(HttpProxy):
    """An event stream (``/sse/``) passed on as it comes, as nginx does with buffering off."""

    async def get(self, *args: str) -> None:
        status: list[int] = []
        headers: list[tuple[str, str]] = []

        def on_header(line: str) -> None:
            line = line.strip()
            if line.startswith("HTTP/"):
                status[:] = [int(line.split()[1])]
                headers.clear()
            elif ":" in line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))

        def on_chunk(chunk: bytes) -> None:
            if not self._headers_written:
                self.set_status(status[0] if status else 200)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.add_header(name, value)
            self.write(chunk)
            self.flush()

        request = HTTPRequest(
            self.upstream + self.request.uri, headers=forwarded_headers(self),
            header_callback=on_header, streaming_callback=on_chunk,
            connect_timeout=5, request_timeout=3600,
        )
        try:
            await AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError as exc:
            log.warning("upstream %s: %s", self.upstream, exc)
        if not self._headers_written:
            raise ApiError(502, "upstream unavailable")
        await self.finish()


class SocketProxy(tornado.websocket.WebSocketHandler):
    """A WebSocket opened on the gateway first, then accepted here and pumped both ways.

    The gateway decides everything (origin, auth, close codes): its close code and
    reason reach the client unchanged; a refused upstream handshake is refused here
    with the same status, as nginx does.
    """

    def initialize(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams
        self.upstream: WebSocketClientConnection | None = None
        self._pump: asyncio.Task[None] | None = None

    def check_origin(self, origin: str) -> bool:
        return True  # the gateway checks it: Origin is passed on

    async def get(self, *args: Any, **kwargs: Any) -> None:
        # Every gateway in turn from the next one, as nginx's upstream with its next
        # upstream on a refused connection: a gateway that is down is skipped.
        for base in self.upstreams.order():
            request = HTTPRequest(
                base + self.request.uri, headers=forwarded_headers(self),
                connect_timeout=5, request_timeout=30,
            )
            try:
                self.upstream = await websocket_connect(request, ping_interval=None,
                                                        max_message_size=64 * 1024 * 1024)
            except HTTPClientError as exc:
                self.set_status(exc.code)
                self.finish()
                return
            except OSError:
                continue
            await super().get(*args, **kwargs)
            return
        self.set_status(502)
        self.finish()

    def open(self, *args: str, **kwargs: str) -> None:
        self._pump = asyncio.ensure_future(self._from_gateway())

    async def _from_gateway(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        while (message := await upstream.read_message()) is not None:
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except tornado.websocket.WebSocketClosedError:
                upstream.close()
                return
        # Gone without a close frame (the gateway was killed): tell the client to resume.
        code = upstream.close_code if upstream.close_code not in (None, 1005, 1006) else 1012
        self.close(code, upstream.close_reason or ("" if upstream.close_code else "gateway gone"))

    def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            self.upstream.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        if self.upstream is not None and self.upstream.protocol is not None:
            code = self.close_code if self.close_code not in (None, 1005, 1006) else 1000
            self.upstream.close(code, self.close_reason or "")


class Upstreams:
    """The gateways behind ``/ws/``, taken round robin."""

    def __init__(self, bases: list[str]) -> None:
        self.bases = bases
        self._next = 0

    def order(self) -> list[str]:
        start = self._next
        self._next = (start + 1) % len(self.bases)
        return self.bases[start:] + self.bases[:start]


class NotFound(JsonHandler):
    def prepare(self) -> None:
        raise ApiError(404, "not found")


def make_app(settings: Settings) -> tornado.web.Application:
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host  # noqa: S104
    backend = f"http://{host}:{settings.backend_port}"
    gateway = f"http://{host}:{settings.gateway_port}"
    sockets = Upstreams([f"ws://{host}:{port}" for port in gateway_ports(settings)])
    return tornado.web.Application(
        [
            (r"/api/.*", HttpProxy, {"upstream": backend}),
            (r"/health", HttpProxy, {"upstream": backend}),
            (r"/ws/.*", SocketProxy, {"upstreams": sockets}),
            # Streams stay on the first gateway in the stand-in (nginx spreads them too).
            (r"/sse/.*", StreamProxy, {"upstream": gateway}),
            (r"/demo(?:/.*)?", HttpProxy, {"upstream": gateway}),
        ],
        default_handler_class=NotFound,
        log_function=logs.log_request,
    )


async def serve(settings: Settings) -> None:
    server = HTTPServer(make_app(settings), max_body_size=MAX_BODY, xheaders=False)
    server.listen(settings.nginx_port, settings.host)
    log.info("proxy on %s:%d (no nginx): /api/ /health → :%d, /ws/ /demo/ → :%d",
             settings.host, settings.nginx_port, settings.backend_port, settings.gateway_port)
    await asyncio.Event().wait()


def main() -> None:
    settings = Settings.from_environ()
    logs.setup_logging(settings.log_level or "INFO")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
