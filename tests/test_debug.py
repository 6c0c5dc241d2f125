"""The gateway's health and debug endpoints report what a support engineer needs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.net import get_json


@pytest.mark.gen_test(timeout=30)
async def test_health_and_status(api: Api, sockets: Sockets, tenant: Tenant, gateway: Any) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    code, health = await get_json(f"{base}/health")
    assert code == 200
    assert health["status"] == "ok" and health["listener"] == "up"

    dialog_id, guest = await api.widget_dialog(tenant)
    await sockets.open(sockets.admin_url(tenant, dialog_id))
    await sockets.open(sockets.widget_url(tenant, dialog_id, guest), origin="https://shop.example")
    await sockets.open(sockets.site_url(tenant, dialog_id))
    code, status = await get_json(f"{base}/api/debug/websocket/status")
    assert code == 200
    assert status["connections"] == {"total": 3, "admin": 1, "widget": 1, "site": 1, "inbox": 0}
    assert status["dialogs"][str(dialog_id)] == {"admin": 1, "widget": 1, "site": 1}
    assert status["listener"]["state"] == "up"


@pytest.mark.gen_test(timeout=30)
async def test_sync_reports_sockets_and_in_sync(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Any
) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin="https://shop.example")
    for i in range(3):
        await api.post_widget(dialog_id, guest, f"m{i}")
    await admin.wait_for_seq(3)
    await widget.wait_for_seq(3)
    code, sync = await get_json(f"{base}/api/debug/websocket/sync?dialog_id={dialog_id}")
    assert code == 200
    assert sync["sockets"] == {"admin": 1, "widget": 1, "site": 0}
    assert sync["db_last_seq"] == 3
    assert sync["delivered_last_seq"] == 3
    assert sync["in_sync"] is True

    code, body = await get_json(f"{base}/api/debug/websocket/sync?dialog_id=abc")
    assert code == 400 and "error" in body


@pytest.mark.gen_test(timeout=30)
async def test_debug_needs_a_token_through_a_proxy(
    api: Api, sockets: Sockets, make_tenant: Any, gateway: Any
) -> None:
    alice, bob = make_tenant(), make_tenant()
    base = f"http://127.0.0.1:{gateway.port}"
    dialog_id = await api.site_dialog(alice)
    await sockets.open(sockets.site_url(alice, dialog_id))
    proxied = {"X-Forwarded-For": "203.0.113.9"}
    for path in ("/api/debug/websocket/status", f"/api/debug/websocket/sync?dialog_id={dialog_id}",
                 "/metrics"):
        code, _ = await get_json(base + path, **proxied)
        assert code == 401, path
    code, status = await get_json(base + "/api/debug/websocket/status",
                             Authorization=f"Bearer {alice.token}", **proxied)
    assert code == 200 and str(dialog_id) in status["dialogs"]
    code, status = await get_json(base + "/api/debug/websocket/status",
                             Authorization=f"Bearer {bob.token}", **proxied)
    assert code == 200 and str(dialog_id) not in status["dialogs"]
    code, _ = await get_json(base + f"/api/debug/websocket/sync?dialog_id={dialog_id}",
                        Authorization=f"Bearer {bob.token}", **proxied)
    assert code == 404


@pytest.mark.gen_test(timeout=30)
async def test_metrics_are_prometheus_text(api: Api, sockets: Sockets, tenant: Tenant,
                                           gateway: Any) -> None:
    dialog_id = await api.site_dialog(tenant)
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    await api.post_site(tenant, dialog_id, "count me")
    await client.wait_for_seq(1)
    code, text = await get_json(f"http://127.0.0.1:{gateway.port}/metrics")
    assert code == 200
    text = text.decode()
    assert 'replyx_sockets{kind="site"} 1.0' in text
    # A fresh gateway per test: the counter is this test's one message, not just a name.
    assert "replyx_frames_sent_total 1.0" in text
    assert "replyx_notification_lag_seconds_bucket" in text
