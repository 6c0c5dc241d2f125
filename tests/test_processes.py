"""supervisord and nginx on the shared production-like stack (``ops`` in tests/fix_stack.py):
restarting the backend leaves sockets open; nginx routes /api/, /ws/ and the demo pages."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote, urlsplit

import orjson
import pytest

from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.fix_stack import Stack
from tests.net import get_text, wait_http


@pytest.mark.gen_test(timeout=90)
async def test_restarting_the_backend_leaves_sockets_open(ops: Stack, tenant: Tenant) -> None:
    api, sockets = Api(ops.api), Sockets(ops.ws)
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    site = await sockets.open(sockets.site_url(tenant, dialog_id))
    before = await api.post_widget(dialog_id, guest, "before the restart")
    old_master = ops.ctl("pid", "backend").strip()

    # supervisorctl blocks until the new gunicorn master is RUNNING.
    await asyncio.get_running_loop().run_in_executor(None, ops.ctl, "restart", "backend")
    assert ops.ctl("pid", "backend").strip() != old_master
    await asyncio.get_running_loop().run_in_executor(None, wait_http, ops.api + "/health")

    after = await api.post_operator(tenant, dialog_id, "after the restart")
    for client in (admin, widget, site):
        await client.wait_for_seq(2, timeout=30)
        assert client.messages == [before, after]
        # The same connection throughout: never closed, never reconnected.
        assert client.close_codes == [] and client.connects == 1
    await sockets.close_all()


@pytest.mark.gen_test(timeout=60)
async def test_nginx_routes_api_and_websockets(ops: Stack, tenant: Tenant) -> None:
    api = Api(ops.nginx)
    sockets = Sockets(ops.nginx.replace("http://", "ws://"))
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    sent = [await api.post_widget(dialog_id, guest, "through nginx"),
            await api.post_operator(tenant, dialog_id, "answered through nginx")]
    for client in (admin, widget):
        await client.wait_for_seq(2)
        assert client.messages == sent
    # The origin rule holds behind the proxy too.
    assert await sockets.refused(sockets.widget_url(tenant, dialog_id, guest),
                                 origin="https://evil.example") == 4003

    # /health goes to the backend; the demo pages and replyx.js to the gateway.
    response = await api.request("GET", "/health")
    assert response.code == 200 and response.body["status"] == "ok"
    code, text = await get_text(ops.nginx + "/demo/replyx.js")
    assert code == 200 and "ReplyX" in text
    await sockets.close_all()

    # nginx's access lines reach log/nginx.log, with paths but never the query's tokens.
    deadline = time.monotonic() + 10
    while f"GET /ws/dialogs/{dialog_id} " not in ops.logs("nginx"):
        assert time.monotonic() < deadline, ops.logs("nginx")[-2000:]
        await asyncio.sleep(0.2)
    assert tenant.token not in ops.logs("nginx") and guest not in ops.logs("nginx")


@pytest.mark.gen_test(timeout=90)
async def test_a_request_in_flight_when_the_backend_restarts_is_still_answered(
    ops: Stack, tenant: Tenant
) -> None:
    """backend/worker.py: an exiting worker answers what it has begun. gunicorn's own tornado
    worker stopped its loop at its second 1 s heartbeat after SIGTERM, whatever was running:
    this request, whose body is still arriving 4 s later, lost its connection."""
    api = Api(ops.api)
    dialog_id = await api.site_dialog(tenant)
    backend = urlsplit(ops.api)
    body = orjson.dumps({"text": "answered across a backend restart"})
    path = f"/api/site/dialogs/{dialog_id}/messages?site_token={quote(tenant.site_token)}"
    reader, writer = await asyncio.open_connection(backend.hostname, backend.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {backend.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body[:5])
    await writer.drain()
    await asyncio.sleep(0.5)  # a worker has begun it
    loop = asyncio.get_running_loop()
    restart = loop.run_in_executor(None, ops.ctl, "restart", "backend")
    await asyncio.sleep(4.0)  # past both of gunicorn's beats, well within graceful_timeout
    writer.write(body[5:])
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    assert response.startswith(b"HTTP/1.1 201"), response[:300]
    message = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
    assert (message["dialog_id"], message["seq"]) == (dialog_id, 1), message
    await restart
    await loop.run_in_executor(None, wait_http, ops.api + "/health")
