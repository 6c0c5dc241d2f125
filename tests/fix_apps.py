"""The backend and the gateway in-process, on free ports, on the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson
import pytest
import tornado.netutil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.websocket import websocket_connect

from backend.app import build_application
from backend.db import Database
from replyx.protocol import CloseCode
from replyx.settings import Settings
from replyx_client import DialogClient
from tests.asyncapi import check_frames
from tests.fix_db import Tenant
from tests.fix_secrets import remember
from ws_gateway.app import Gateway


@dataclass
class Response:
    code: int
    body: Any
    headers: Any


class Api:
    """A JSON client for the backend's HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = AsyncHTTPClient()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Response:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is None and method in ("POST", "PUT"):
            data = b""
        response = await self.http.fetch(
            HTTPRequest(self.base + path, method=method, body=data, headers=headers,
                        request_timeout=30),
            raise_error=False,
        )
        text = response.body or b""
        try:
            parsed = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            parsed = text.decode(errors="replace")
        if isinstance(parsed, dict):
            for key in ("token", "guest_token", "site_token"):
                remember(parsed.get(key), f"{key} issued by {path.split('?')[0]}")
        return Response(response.code, parsed, response.headers)

    async def site_dialog(self, tenant: Tenant) -> int:
        r = await self.request("POST", f"/api/site/dialogs?site_token={quote(tenant.site_token)}")
        assert r.code == 201, r.body
        return r.body["dialog_id"]

    async def widget_dialog(self, tenant: Tenant, origin: str | None = None) -> tuple[int, str]:
        r = await self.request(
            "POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
            headers={"Origin": origin or tenant.domains[0]},
        )
        assert r.code == 201, r.body
        return r.body["dialog_id"], r.body["guest_token"]

    async def post_site(self, tenant: Tenant, dialog_id: int, text: str) -> dict[str, Any]:
        r = await self.request(
            "POST", f"/api/site/dialogs/{dialog_id}/messages?site_token={quote(tenant.site_token)}",
            {"text": text},
        )
        assert r.code == 201, r.body
        return r.body

    async def post_operator(self, tenant: Tenant, dialog_id: int, text: str) -> dict[str, Any]:
        r = await self.request(
            "POST", f"/api/dialogs/{dialog_id}/messages", {"text": text}, token=tenant.token
        )
        assert r.code == 201, r.body
        return r.body

    async def post_widget(self, dialog_id: int, guest_token: str, text: str) -> dict[str, Any]:
        r = await self.request(
            "POST", f"/api/widget/dialogs/{dialog_id}/messages", {"text": text}, token=guest_token
        )
        assert r.code == 201, r.body
        return r.body


#: The reasons a socket is refused with, by close code, as the gateway words them.
REFUSAL_REASONS: dict[int, set[str]] = {
    CloseCode.UNAUTHORIZED: {"missing, invalid or expired token", "site_token is required",
                             "invalid site token", "guest_token is required",
                             "invalid guest token"},
    CloseCode.FORBIDDEN_ORIGIN: {"origin not allowed for this assistant"},
    CloseCode.NOT_FOUND: {"dialog not found"},
    CloseCode.BAD_REQUEST: {"since is ahead of the dialog",
                            "since must be a non-negative integer"},
    CloseCode.TRY_AGAIN: {"database unavailable, try again"},
    CloseCode.POLICY: {"too many connections from this address"},
    CloseCode.RESTARTING: {"gateway restarting, resume with since"},
}


def without_credentials(url: str) -> str:
    """``url`` with the values of its token parameters cut, for assertion messages."""
    parts = urlsplit(url)
    query = [(k, "…" if "token" in k else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def refusal(
    url: str, origin: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int | None, str]:
    """Open a socket that must be refused: its close code and reason.

    Refused means no frame before the close. A socket that was accepted, got a replay
    and ``ready`` and was closed a moment later is not refused, however quick the close
    (DialogClient's ``connect`` could take that for a refusal, so it is not used here).
    ``(None, error)`` when the handshake itself failed.
    """
    headers = dict(headers or {})
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn = await websocket_connect(HTTPRequest(url, headers=headers, request_timeout=10))
    except (OSError, HTTPClientError) as exc:
        return None, str(exc)
    frame = await asyncio.wait_for(conn.read_message(), 10)
    if frame is not None:
        conn.close()
        raise AssertionError(f"{without_credentials(url)} was accepted: it sent {frame[:200]!r}")
    # Our close reply is on its way; give the gateway the few loop turns it needs to read it
    # and forget the socket, as DialogClient's slower path used to (callers check that).
    await asyncio.sleep(0.05)
    return conn.close_code, conn.close_reason or ""


class Sockets:
    """URLs of the three endpoints of one gateway, and clients on them."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.clients: list[DialogClient] = []

    def admin_url(self, tenant: Tenant, dialog_id: int | str) -> str:
        return f"{self.base}/ws/dialogs/{dialog_id}?token={quote(tenant.token)}"

    def site_url(self, tenant: Tenant, dialog_id: int | str) -> str:
        return f"{self.base}/ws/site/dialogs/{dialog_id}?site_token={quote(tenant.site_token)}"

    def widget_url(
        self, tenant: Tenant, dialog_id: int | str, guest_token: str, **extra: str
    ) -> str:
        url = (f"{self.base}/ws/widget/dialogs/{dialog_id}?assistant_id={tenant.assistant_id}"
               f"&guest_token={quote(guest_token)}")
        for key, value in extra.items():
            url += f"&{key}={quote(value)}"
        return url

    async def open(self, url: str, **kwargs: Any) -> DialogClient:
        client = DialogClient(url, **kwargs)
        self.clients.append(client)
        return await client.connect()

    async def refused(self, url: str, origin: str | None = None) -> int | None:
        """Open a socket expected to be refused; return its close code.

        Refused means closed before any frame: see :func:`refusal`, which also checks
        that the reason is the contract's for that code (:data:`REFUSAL_REASONS`).
        """
        code, reason = await refusal(url, origin)
        if code in REFUSAL_REASONS:
            assert reason in REFUSAL_REASONS[code], (code, reason)
        return code

    async def close_all(self) -> None:
        for client in self.clients:
            await client.close()
        # Whatever the test looked at, every frame received is one the protocol's
        # document describes (docs/asyncapi.yaml), valid against its schema.
        for client in self.clients:
            check_frames(client.url, [frame.data for frame in client.frames])


def start_backend(io_loop: IOLoop, settings: Settings, database_url: str) -> tuple[str, Any]:
    db = Database(database_url)
    app = build_application(settings, db, settings.jwt_secret())
    server = HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]

    def stop() -> None:
        server.stop()
        io_loop.run_sync(server.close_all_connections)
        io_loop.run_sync(db.dispose)

    return f"http://127.0.0.1:{port}", stop


def start_gateway(io_loop: IOLoop, settings: Settings, database_url: str) -> Gateway:
    gateway = Gateway(settings, database_url)
    io_loop.run_sync(lambda: gateway.start(port=0, host="127.0.0.1"))
    return gateway


@pytest.fixture
def api(io_loop: IOLoop, settings: Settings, database_url: str) -> Iterator[Api]:
    base, stop = start_backend(io_loop, settings, database_url)
    yield Api(base)
    stop()


@pytest.fixture
def gateway(io_loop: IOLoop, settings: Settings, database_url: str) -> Iterator[Gateway]:
    gw = start_gateway(io_loop, settings, database_url)
    yield gw
    io_loop.run_sync(gw.stop, timeout=30)


@pytest.fixture
def sockets(io_loop: IOLoop, gateway: Gateway) -> Iterator[Sockets]:
    s = Sockets(f"ws://127.0.0.1:{gateway.port}")
    yield s
    io_loop.run_sync(s.close_all, timeout=30)
