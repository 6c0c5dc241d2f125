"""supervisord and nginx on the shared production-like stack (``ops`` in tests/fix_stack.py):
restarting the backend leaves sockets open; nginx routes /api/, /ws/ and the demo pages."""

from __future__ import annotations

import asyncio
import time

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
