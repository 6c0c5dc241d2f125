"""The backend's HTTP API: every endpoint of the contract, and its 4xx JSON errors."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.fix_apps import Api
from tests.fix_db import Tenant


@pytest.mark.gen_test(timeout=30)
async def test_login_and_operator_endpoints(api: Api, tenant: Tenant) -> None:
    r = await api.request("POST", "/api/auth/login",
                          {"email": tenant.email.upper(), "password": tenant.password})
    assert r.code == 200
    token = r.body["token"]

    site_dialog = await api.site_dialog(tenant)
    widget_dialog, _ = await api.widget_dialog(tenant)
    r = await api.request("GET", "/api/dialogs", token=token)
    assert r.code == 200
    assert {d["dialog_id"] for d in r.body["dialogs"]} == {site_dialog, widget_dialog}

    posted = [await api.post_operator(tenant, site_dialog, f"reply {i}") for i in range(3)]
    assert [m["seq"] for m in posted] == [1, 2, 3]
    assert posted[0]["sender"] == "operator"
    r = await api.request("GET", f"/api/dialogs/{site_dialog}/messages?since=1", token=token)
    assert r.code == 200 and r.body["messages"] == posted[1:]
    r = await api.request("GET", f"/api/dialogs/{site_dialog}/messages?token={quote(token)}")
    assert r.code == 200 and r.body["messages"] == posted


@pytest.mark.gen_test(timeout=30)
async def test_login_failures(api: Api, tenant: Tenant) -> None:
    for body in ({"email": tenant.email, "password": "wrong"},
                 {"email": "nobody@example.com", "password": tenant.password}):
        r = await api.request("POST", "/api/auth/login", body)
        assert r.code == 401 and r.body == {"error": "wrong email or password"}


@pytest.mark.gen_test(timeout=30)
async def test_site_and_widget_flows(api: Api, tenant: Tenant) -> None:
    dialog_id = await api.site_dialog(tenant)
    message = await api.post_site(tenant, dialog_id, "from the site")
    assert message["sender"] == "visitor" and message["dialog_id"] == dialog_id
    r = await api.request(
        "POST", f"/api/site/dialogs/{dialog_id}/messages?site_token={quote(tenant.site_token)}",
        {"text": "as the bot", "sender": "assistant"})
    assert r.code == 201 and r.body["sender"] == "assistant"

    widget_dialog, guest = await api.widget_dialog(tenant)
    assert guest.startswith("rxg_")
    r = await api.request(
        "POST", f"/api/widget/dialogs/{widget_dialog}/messages?guest_token={guest}",
        {"text": "query-string guest token"})
    assert r.code == 201
    r = await api.request("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
                          headers={"Origin": "https://evil.example"})
    assert r.code == 403 and "error" in r.body
    r = await api.request("OPTIONS", "/api/widget/dialogs",
                          headers={"Origin": "https://shop.example",
                                   "Access-Control-Request-Method": "POST"})
    assert r.code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://shop.example"


@pytest.mark.gen_test(timeout=30)
async def test_credentials_are_scoped(api: Api, make_tenant: Any) -> None:
    alice, bob = make_tenant(), make_tenant()
    alice_dialog, alice_guest = await api.widget_dialog(alice)
    bob_dialog, _ = await api.widget_dialog(bob)
    cases = [
        ("GET", f"/api/dialogs/{alice_dialog}/messages", bob.token, None),
        ("POST", f"/api/dialogs/{alice_dialog}/messages", bob.token, {"text": "x"}),
        ("POST", f"/api/site/dialogs/{alice_dialog}/messages?site_token={quote(bob.site_token)}",
         None, {"text": "x"}),
        ("POST", f"/api/widget/dialogs/{bob_dialog}/messages", alice_guest, {"text": "x"}),
    ]
    for method, path, token, body in cases:
        r = await api.request(method, path, body, token=token)
        assert r.code == 404, path
        assert r.body == {"error": "dialog not found"}


@pytest.mark.gen_test(timeout=30)
async def test_bad_input_gets_a_4xx_json_error(api: Api, tenant: Tenant) -> None:
    dialog_id = await api.site_dialog(tenant)
    messages = f"/api/dialogs/{dialog_id}/messages"
    cases = [
        ("POST", messages, None, b"{not json", 400),
        ("POST", messages, None, b"[1, 2]", 400),
        ("POST", messages, {"text": 5}, None, 400),
        ("POST", messages, {"text": ""}, None, 400),
        ("POST", messages, {"text": "   "}, None, 400),
        ("POST", messages, {}, None, 400),
        ("POST", messages, {"text": "a\u0000b"}, None, 400),
        ("POST", messages, {"text": "x" * 40_000}, None, 413),
        ("POST", messages, None, b'{"text": "' + b"x" * (1024 * 1024 + 10) + b'"}', 413),
        ("GET", f"{messages}?since=abc", None, None, 400),
        # Present but empty is not a number either (the document says integer).
        ("GET", f"{messages}?since=", None, None, 400),
        ("GET", "/api/dialogs?before=", None, None, 400),
        ("GET", f"{messages}?since=-5", None, None, 400),
        ("GET", f"{messages}?limit=0", None, None, 400),
        ("GET", "/api/dialogs/abc/messages", None, None, 404),
        ("GET", "/api/dialogs/99999999999/messages", None, None, 404),
        ("GET", "/api/dialogs/" + "9" * 40 + "/messages", None, None, 404),
        ("GET", "/api/nothing-here", None, None, 404),
        ("DELETE", messages, None, None, 405),
        ("POST", "/api/widget/dialogs", {"assistant_id": "1"}, None, 400),
        ("POST", "/api/widget/dialogs", {"assistant_id": True}, None, 400),
        ("POST", "/api/widget/dialogs", None, b'{"assistant_id": 1180591620717411303424}', 400),
        ("POST", "/api/widget/dialogs", {"assistant_id": 987654321}, None, 404),
        ("POST", "/api/auth/login", {"email": ["a"], "password": "x"}, None, 400),
    ]
    for method, path, body, raw, expected in cases:
        r = await api.request(method, path, body, raw=raw, token=tenant.token,
                              headers={"Origin": "https://shop.example"})
        assert r.code == expected, (method, path, body, r.code, r.body)
        assert isinstance(r.body, dict) and set(r.body) == {"error"}, (path, r.body)
        assert "Traceback" not in r.body["error"]


@pytest.mark.gen_test(timeout=30)
async def test_unauthenticated_calls_get_401(api: Api, tenant: Tenant) -> None:
    dialog_id = await api.site_dialog(tenant)
    for method, path in (("GET", "/api/dialogs"),
                         ("GET", f"/api/dialogs/{dialog_id}/messages"),
                         ("POST", f"/api/site/dialogs/{dialog_id}/messages"),
                         ("POST", "/api/site/dialogs"),
                         ("POST", f"/api/widget/dialogs/{dialog_id}/messages")):
        r = await api.request(method, path, {"text": "x"} if method == "POST" else None)
        assert r.code == 401, path
        assert "error" in r.body


@pytest.mark.gen_test(timeout=30)
async def test_sql_looking_text_is_stored_verbatim(api: Api, tenant: Tenant) -> None:
    dialog_id = await api.site_dialog(tenant)
    text = "'); DROP TABLE messages; -- \\ % _ $1"
    message = await api.post_site(tenant, dialog_id, text)
    assert message["text"] == text
    r = await api.request("GET", f"/api/dialogs/{dialog_id}/messages", token=tenant.token)
    assert r.body["messages"][0]["text"] == text


@pytest.mark.gen_test(timeout=30)
async def test_backend_health(api: Api) -> None:
    r = await api.request("GET", "/health")
    assert r.code == 200 and r.body["status"] == "ok"
