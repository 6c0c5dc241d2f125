"""Who may open which socket: close codes 4001, 4003, 4004 and the seed's log lines."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant


@pytest.mark.gen_test(timeout=30)
async def test_foreign_origin_is_refused_with_4003_and_logged(
    api: Api, sockets: Sockets, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    caplog.set_level(logging.INFO)
    url = sockets.widget_url(tenant, dialog_id, guest)
    for origin in ("https://evil.example", "https://shop.example.evil.com",
                   "http://shop.example", None):
        assert await sockets.refused(url, origin=origin) == 4003, origin
    lines = [r.getMessage() for r in caplog.records if "WEBSOCKET_4003_ERROR" in r.getMessage()]
    assert len(lines) == 4
    assert lines[0].startswith("[Widget] WEBSOCKET_4003_ERROR")
    assert f"dialog_id={dialog_id}" in lines[0]
    assert guest not in "\n".join(r.getMessage() for r in caplog.records)
    # The allowed origin still gets in.
    await sockets.open(url, origin="https://shop.example")


@pytest.mark.gen_test(timeout=30)
async def test_widget_origin_rule_for_our_own_iframe(
    api: Api, sockets: Sockets, make_tenant: Any, gateway: Any
) -> None:
    """Inside the product's iframe, parent_origin is checked; everywhere else it is ignored."""
    tenant = make_tenant(["https://shop.example"])
    dialog_id, guest = await api.widget_dialog(tenant)
    widget_host = "https://widget.replyx.example"
    object.__setattr__(gateway.settings, "widget_origin", widget_host)

    inside = sockets.widget_url(tenant, dialog_id, guest, parent_origin="https://shop.example")
    await sockets.open(inside, origin=widget_host)

    foreign_parent = sockets.widget_url(tenant, dialog_id, guest, parent_origin="https://evil.example")
    assert await sockets.refused(foreign_parent, origin=widget_host) == 4003
    # parent_origin from anyone but the widget host is ignored: Origin decides.
    spoofed = sockets.widget_url(tenant, dialog_id, guest, parent_origin="https://shop.example")
    assert await sockets.refused(spoofed, origin="https://evil.example") == 4003
    assert await sockets.refused(
        sockets.widget_url(tenant, dialog_id, guest), origin=widget_host
    ) == 4003


@pytest.mark.gen_test(timeout=30)
async def test_bad_tokens_get_4001(api: Api, sockets: Sockets, tenant: Tenant) -> None:
    dialog_id, _ = await api.widget_dialog(tenant)
    base = sockets.base
    for url in (
        f"{base}/ws/dialogs/{dialog_id}",
        f"{base}/ws/dialogs/{dialog_id}?token=garbage",
        f"{base}/ws/dialogs/{dialog_id}?token={tenant.token[:-4]}AAAA",
        f"{base}/ws/site/dialogs/{dialog_id}",
        f"{base}/ws/site/dialogs/{dialog_id}?site_token=rxs_wrong",
        f"{base}/ws/widget/dialogs/{dialog_id}?assistant_id={tenant.assistant_id}",
        f"{base}/ws/widget/dialogs/{dialog_id}?guest_token=rxg_wrong",
    ):
        assert await sockets.refused(url, origin="https://shop.example") == 4001, url


@pytest.mark.gen_test(timeout=30)
async def test_another_tenants_dialog_gets_4004(
    api: Api, sockets: Sockets, make_tenant: Any
) -> None:
    alice, bob = make_tenant(), make_tenant()
    alice_dialog, alice_guest = await api.widget_dialog(alice)
    bob_dialog, bob_guest = await api.widget_dialog(bob)
    origin = "https://shop.example"
    assert await sockets.refused(sockets.admin_url(bob, alice_dialog)) == 4004
    assert await sockets.refused(sockets.site_url(bob, alice_dialog)) == 4004
    # Bob's guest token on Alice's dialog, and a wrong assistant_id: not yours.
    assert await sockets.refused(
        sockets.widget_url(alice, alice_dialog, bob_guest), origin=origin) == 4004
    assert await sockets.refused(
        sockets.widget_url(bob, alice_dialog, alice_guest), origin=origin) == 4004
    # Dialogs that do not exist look the same as dialogs that are not yours.
    for missing in ("999999999", "0", "abc", "-1", "9" * 30):
        assert await sockets.refused(sockets.admin_url(alice, missing)) == 4004, missing
    # And each owner still gets in.
    await sockets.open(sockets.admin_url(alice, alice_dialog))
    await sockets.open(sockets.widget_url(bob, bob_dialog, bob_guest), origin=origin)


@pytest.mark.gen_test(timeout=30)
async def test_malformed_since_is_refused(api: Api, sockets: Sockets, tenant: Tenant) -> None:
    dialog_id = await api.site_dialog(tenant)
    for bad in ("abc", "-1", "1.5", "9" * 25):
        url = sockets.site_url(tenant, dialog_id) + f"&since={bad}"
        assert await sockets.refused(url) == 4400
