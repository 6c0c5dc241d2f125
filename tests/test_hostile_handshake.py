"""Hostile WebSocket handshakes and credentials: JWT forgeries, keys, scope, origins, expiry,
debug endpoints.

Sockets are refused after the handshake with the contract's close codes (4001 bad
credential, 4003 origin, 4004 dialog not found or not yours); the same credentials
on HTTP get 401 / 403 / 404 JSON.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import orjson
import psutil
import pytest

from replyx import security
from replyx.settings import ConfigError, Settings
from replyx_client import DialogClient
from tests.fix_apps import Api, Sockets, refusal
from tests.fix_db import TEST_JWT_SECRET, Tenant, child_environ, make_settings
from tests.fix_secrets import remember
from tests.net import get_json
from ws_gateway.app import Gateway

KEY = TEST_JWT_SECRET.encode()
ORIGIN_REFUSED = "origin not allowed for this assistant"
WIDGET_HOST = "https://widget.replyx.example"
BIN = Path(sys.executable).parent


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The product's own iframe host, so parent_origin has a case where it counts.
    return make_settings(tmp_path / "var", REPLYX_WIDGET_ORIGIN=WIDGET_HOST)


# -- helpers ---------------------------------------------------------------------------


def b64url(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()


def claims(user_id: int, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(user_id), "iss": security.JWT_ISSUER, "aud": security.JWT_AUDIENCE,
        "iat": now, "exp": now + 3600,
    }
    for name, value in changes.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def signed(payload: dict[str, Any], key: bytes = KEY, alg: str = "HS256") -> str:
    token = jwt.encode(payload, key, algorithm=alg)
    remember(token, "forged JWT")
    return token


def forged_tokens(user_id: int, good: str) -> dict[str, str]:
    """Every way an operator JWT can be wrong; each must be refused."""
    head, body, signature = good.split(".")
    now = int(time.time())
    tampered_body = b64url(claims(user_id + 1))
    return {
        "wrong key": signed(claims(user_id), os.urandom(48)),
        "expired": signed(claims(user_id, iat=now - 7200, exp=now - 60)),
        "alg none": f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims(user_id))}.",
        "alg none, real signature": f"{b64url({'alg': 'none'})}.{body}.{signature}",
        "alg HS512 with the right key": signed(claims(user_id), alg="HS512"),
        "missing exp": signed(claims(user_id, exp=None)),
        "missing iss": signed(claims(user_id, iss=None)),
        "wrong iss": signed(claims(user_id, iss="someone-else")),
        "missing aud": signed(claims(user_id, aud=None)),
        "wrong aud": signed(claims(user_id, aud="replyx-guest")),
        "missing sub": signed(claims(user_id, sub=None)),
        "sub not a number": signed(claims(user_id, sub="admin")),
        "sub zero": signed(claims(user_id, sub="0")),
        "sub huge": signed(claims(user_id, sub="9" * 40)),
        "not yet valid": signed(claims(user_id, nbf=now + 3600)),
        "exp beyond any float": signed(claims(user_id, exp=10**400)),
        "tampered payload": f"{head}.{tampered_body}.{signature}",
        "truncated signature": good[:-6],
        "garbage": "garbage",
        "three dots": "a.b.c",
        "base64 junk": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.bm90IGEgc2lnbmF0dXJl",
    }


async def opens(url: str, origin: str | None = None) -> None:
    client = DialogClient(url, origin=origin, resume=False)
    await client.connect()
    await client.close()


# -- 1. operator JWTs ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.gen_test(timeout=60)
async def test_every_forged_or_broken_jwt_gets_4001_and_401(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway
) -> None:
    dialog_id = await api.site_dialog(tenant)
    debug = f"http://127.0.0.1:{gateway.port}/api/debug/websocket/status"
    proxied = {"X-Real-IP": "203.0.113.7"}
    for name, token in forged_tokens(tenant.user_id, tenant.token).items():
        quoted = quote(token, safe="")
        assert await refusal(f"{sockets.base}/ws/dialogs/{dialog_id}?token={quoted}") == (
            4001, "missing, invalid or expired token"), name
        assert await refusal(f"{sockets.base}/ws/dialogs/{dialog_id}",
                             headers={"Authorization": f"Bearer {token}"}) == (
            4001, "missing, invalid or expired token"), name
        r = await api.request("GET", f"/api/dialogs/{dialog_id}/messages", token=token)
        assert r.code == 401, name
        assert r.body == {"error": "missing, invalid or expired operator token"}, name
        r = await api.request("GET", f"/api/dialogs?token={quoted}")
        assert r.code == 401, name
        code, body = await get_json(debug, Authorization=f"Bearer {token}", **proxied)
        assert code == 401 and set(body) == {"error"}, name

    # The genuine token, in both places, still works: the refusals above are about the tokens.
    await sockets.open(sockets.admin_url(tenant, dialog_id))
    code, _ = await get_json(debug, Authorization=f"Bearer {tenant.token}", **proxied)
    assert code == 200


def test_verification_never_fails_with_anything_but_invalid_token() -> None:
    """Signed with the right key, any claims either verify or raise InvalidTokenError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    values = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
        st.text(max_size=30), st.lists(st.integers(), max_size=3),
        st.integers(min_value=2**60, max_value=2**70).map(str),
    )
    names = st.sampled_from(["sub", "iss", "aud", "exp", "nbf", "iat", "other"])

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(names, values, max_size=7))
    def check(payload: dict[str, Any]) -> None:
        try:
            token = jwt.encode(payload, KEY, algorithm="HS256")
        except (TypeError, ValueError, OverflowError):
            return  # PyJWT refuses to sign it: nothing to verify
        try:
            verified = security.verify_operator_token(token, KEY)
        except security.InvalidTokenError:
            return
        assert 0 < verified.user_id < 2**63
        assert verified.expires_at > time.time() - 5

    check()


def test_short_jwt_keys_are_refused_at_start_up(tmp_path: Path) -> None:
    short = "k" * 31
    with pytest.raises(ConfigError, match="REPLYX_JWT_SECRET is 31 bytes") as caught:
        Settings.from_environ({"REPLYX_DATA_DIR": str(tmp_path), "REPLYX_JWT_SECRET": short})
    assert short not in str(caught.value)
    Settings.from_environ({"REPLYX_DATA_DIR": str(tmp_path), "REPLYX_JWT_SECRET": "k" * 32})

    env = child_environ(REPLYX_DATA_DIR=str(tmp_path), REPLYX_JWT_SECRET=short)
    for argv in ([str(BIN / "python"), "-m", "ws_gateway"],
                 [str(BIN / "replyx"), "run", "--no-demo"],
                 [str(BIN / "replyx"), "token", "--user-id", "1"]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 2, (argv, result.stderr)
        assert "REPLYX_JWT_SECRET" in result.stderr and "at least 32" in result.stderr
        assert short not in result.stderr + result.stdout


def test_generated_key_is_private_random_and_checked(tmp_path: Path) -> None:
    first = Settings.from_environ({"REPLYX_DATA_DIR": str(tmp_path / "a")})
    key = first.jwt_secret()
    remember(key.decode(), "generated JWT key")
    path = tmp_path / "a" / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    # Stable for every process of one data dir, different for another: never a constant.
    assert Settings.from_environ({"REPLYX_DATA_DIR": str(tmp_path / "a")}).jwt_secret() == key
    other = Settings.from_environ({"REPLYX_DATA_DIR": str(tmp_path / "b")}).jwt_secret()
    remember(other.decode(), "generated JWT key")
    assert other != key

    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by other users.*chmod 600"):
        first.jwt_secret()
    path.write_text("too-short")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32 are required"):
        first.jwt_secret()


# -- 2. scope -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_every_credential_reaches_only_its_own_dialogs_on_sockets(
    api: Api, sockets: Sockets, make_tenant: Callable[..., Tenant]
) -> None:
    alice = make_tenant(["https://shop.example"])
    bob = make_tenant(["https://bob.example"])
    a_widget, a_guest = await api.widget_dialog(alice)
    a_widget2, a_guest2 = await api.widget_dialog(alice)
    a_site = await api.site_dialog(alice)
    b_widget, b_guest = await api.widget_dialog(bob)
    missing = 9_000_000_000
    shop, bob_shop = "https://shop.example", "https://bob.example"
    base = sockets.base

    def widget(dialog: int, guest: str, assistant: object = alice.assistant_id) -> str:
        return (f"{base}/ws/widget/dialogs/{dialog}?assistant_id={assistant}"
                f"&guest_token={quote(guest)}")

    allowed = [
        (sockets.admin_url(alice, a_widget), None),
        (sockets.admin_url(alice, a_site), None),
        (sockets.admin_url(bob, b_widget), None),
        (sockets.site_url(alice, a_widget), None),
        (sockets.site_url(alice, a_site), None),
        (widget(a_widget, a_guest), shop),
        (f"{base}/ws/widget/dialogs/{a_widget}?guest_token={quote(a_guest)}", shop),
        (widget(b_widget, b_guest, bob.assistant_id), bob_shop),
    ]
    for url, origin in allowed:
        await opens(url, origin)

    not_yours = [
        (sockets.admin_url(bob, a_widget), None),
        (sockets.admin_url(alice, b_widget), None),
        (sockets.site_url(bob, a_site), None),
        (sockets.site_url(alice, b_widget), None),
        (widget(a_widget2, a_guest), shop),             # a guest token names one dialog
        (widget(a_widget, a_guest2), shop),
        (widget(a_site, a_guest), shop),
        (widget(a_widget, b_guest), shop),
        (widget(a_widget, b_guest, bob.assistant_id), bob_shop),
        (widget(a_widget, a_guest, bob.assistant_id), shop),  # assistant_id is cross-checked
        (widget(a_widget, a_guest, "abc"), shop),
    ]
    not_found = [
        (sockets.admin_url(alice, missing), None),
        (sockets.site_url(alice, missing), None),
        (widget(missing, a_guest), shop),
    ]
    reasons = set()
    for url, origin in not_yours + not_found:
        code, reason = await refusal(url, origin)
        assert code == 4004, url
        reasons.add(reason)
    assert reasons == {"dialog not found"}  # "not yours" and "not there" look the same

    # A credential of one kind is no credential of another.
    operator, site, guest = ("missing, invalid or expired token", "invalid site token",
                             "invalid guest token")
    wrong_kind = [
        (f"{base}/ws/dialogs/{a_widget}?token={quote(a_guest)}", operator),
        (f"{base}/ws/dialogs/{a_widget}?token={quote(alice.site_token)}", operator),
        (f"{base}/ws/site/dialogs/{a_widget}?site_token={quote(alice.token)}", site),
        (f"{base}/ws/site/dialogs/{a_widget}?site_token={quote(a_guest)}", site),
        (widget(a_widget, alice.site_token), guest),
        (widget(a_widget, alice.token), guest),
    ]
    for url, reason in wrong_kind:
        assert await refusal(url, shop) == (4001, reason), url


@pytest.mark.gen_test(timeout=60)
async def test_every_credential_reaches_only_its_own_dialogs_over_http(
    api: Api, make_tenant: Callable[..., Tenant]
) -> None:
    alice = make_tenant(["https://shop.example"])
    bob = make_tenant(["https://bob.example"])
    a_widget, a_guest = await api.widget_dialog(alice)
    a_widget2, _ = await api.widget_dialog(alice)
    b_widget, b_guest = await api.widget_dialog(bob)
    missing = 9_000_000_000

    def calls(dialog: int) -> list[tuple[str, str, str, dict[str, Any] | None]]:
        return [
            ("operator", "GET", f"/api/dialogs/{dialog}/messages", None),
            ("operator", "POST", f"/api/dialogs/{dialog}/messages", {"text": "x"}),
            ("operator", "POST", f"/api/dialogs/{dialog}/typing", None),
            ("site", "POST", f"/api/site/dialogs/{dialog}/messages", {"text": "x"}),
            ("site", "POST", f"/api/site/dialogs/{dialog}/typing", None),
            ("guest", "POST", f"/api/widget/dialogs/{dialog}/messages", {"text": "x"}),
            ("guest", "POST", f"/api/widget/dialogs/{dialog}/typing", None),
        ]

    own = {"operator": alice.token, "site": alice.site_token, "guest": a_guest}
    bodies = set()
    for dialog in (a_widget2, b_widget, missing):
        for kind, method, path, body in calls(dialog):
            r = await api.request(method, path, body, token=own[kind])
            if dialog == a_widget2 and kind != "guest":
                assert r.code in (200, 201, 204), (kind, path, r.body)
                continue
            assert r.code == 404, (kind, path, r.code, r.body)
            bodies.add(orjson.dumps(r.body))
    assert bodies == {b'{"error":"dialog not found"}'}  # "not yours" and "not there" alike

    # Bob's credentials on Alice's dialog, and kinds swapped: never through.
    for kind, method, path, body in calls(a_widget):
        theirs = {"operator": bob.token, "site": bob.site_token, "guest": b_guest}
        r = await api.request(method, path, body, token=theirs[kind])
        assert r.code == 404, (kind, path, r.code)
    for kind, method, path, body in calls(a_widget):
        wrong = {"operator": a_guest, "site": alice.token, "guest": alice.site_token}[kind]
        r = await api.request(method, path, body, token=wrong)
        assert r.code == 401, (kind, path, r.code)
        assert set(r.body) == {"error"}

    # The dialog list is the operator's own only.
    r = await api.request("GET", "/api/dialogs", token=bob.token)
    assert {d["dialog_id"] for d in r.body["dialogs"]} == {b_widget}


# -- 3. origins ------------------------------------------------------------------------------

SPOOFS = [
    "https://shop.example.evil.com",
    "https://evil.com/shop.example",
    "https://evil.com?shop.example",
    "https://evil.com#https://shop.example",
    "https://shop.example@evil.com",
    "https://evil-shop.example",
    "https://shop.example.",
    "https://xshop.example",
    "http://shop.example",          # scheme is part of the origin
    "https://shop.example:8443",    # so is the port
    "wss://shop.example",
    "null",
    "https://shop.example, https://evil.com",
]


@pytest.mark.gen_test(timeout=60)
async def test_spoofed_and_missing_origins_are_refused_with_4003_and_logged(
    api: Api, sockets: Sockets, make_tenant: Callable[..., Tenant],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenant = make_tenant(["https://shop.example", "http://localhost:3000"])
    dialog_id, guest = await api.widget_dialog(tenant)
    url = sockets.widget_url(tenant, dialog_id, guest)
    caplog.set_level(logging.INFO)

    for origin in [*SPOOFS, "http://localhost:3001", "http://localhost", None]:
        assert await refusal(url, origin) == (4003, ORIGIN_REFUSED), origin
        headers = {"Origin": origin} if origin else {}
        r = await api.request("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
                              headers=headers)
        assert r.code == 403, origin
        assert r.body == {"error": "origin not allowed for this assistant"}, origin
    refusals = [r.getMessage() for r in caplog.records if "WEBSOCKET_4003_ERROR" in r.getMessage()]
    ws_lines = [line for line in refusals if "code=4003" in line]
    assert len(ws_lines) == len(SPOOFS) + 3
    assert len(refusals) == 2 * (len(SPOOFS) + 3)  # and one per refused HTTP call
    assert all(line.startswith("[Widget] WEBSOCKET_4003_ERROR") for line in refusals)

    for origin in ("https://shop.example", "https://SHOP.example", "https://shop.example:443",
                   "http://localhost:3000"):
        await opens(url, origin)


@pytest.mark.gen_test(timeout=60)
async def test_parent_origin_counts_only_inside_our_own_iframe(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)

    def url(parent: str | None) -> str:
        extra = {"parent_origin": parent} if parent is not None else {}
        return sockets.widget_url(tenant, dialog_id, guest, **extra)

    await opens(url("https://shop.example"), WIDGET_HOST)
    await opens(url("evil"), "https://shop.example")  # ignored outside the iframe
    for parent in [*SPOOFS, "", None]:
        assert await refusal(url(parent), WIDGET_HOST) == (4003, ORIGIN_REFUSED), parent
    assert await refusal(url("https://shop.example"), "https://evil.example") == (
        4003, ORIGIN_REFUSED)

    async def create(origin: str, parent: str | None) -> int:
        body: dict[str, Any] = {"assistant_id": tenant.assistant_id}
        if parent is not None:
            body["parent_origin"] = parent
        r = await api.request("POST", "/api/widget/dialogs", body, headers={"Origin": origin})
        return r.code

    assert await create(WIDGET_HOST, "https://shop.example") == 201
    assert await create(WIDGET_HOST, "https://shop.example.evil.com") == 403
    assert await create(WIDGET_HOST, None) == 403
    assert await create("https://evil.example", "https://shop.example") == 403


# -- 4. expiry during a connection ------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_an_operator_socket_is_closed_4001_when_its_token_expires(
    api: Api, sockets: Sockets, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    dialog_id = await api.site_dialog(tenant)
    short = security.issue_operator_token(tenant.user_id, KEY, 3)
    remember(short, "short-lived operator JWT")
    expiring = await sockets.open(f"{sockets.base}/ws/dialogs/{dialog_id}?token={short}",
                                  resume=False)
    lasting = await sockets.open(sockets.admin_url(tenant, dialog_id))
    assert await expiring.wait_closed(timeout=30) == 4001
    assert expiring.final_close is not None and expiring.final_close.reason == "token expired"
    assert any("[Admin] token expired" in r.getMessage() for r in caplog.records)
    # The long-lived socket on the same dialog is untouched and still receives.
    await api.post_site(tenant, dialog_id, "after the expiry")
    await lasting.wait_for_seq(1)
    # And the expired token cannot open a new socket.
    assert await refusal(f"{sockets.base}/ws/dialogs/{dialog_id}?token={short}") == (
        4001, "missing, invalid or expired token")


# -- 5. debug endpoints and /metrics -----------------------------------------------------------

DEBUG_PATHS = ("/api/debug/websocket/status", "/api/debug/websocket/sync?dialog_id={d}",
               "/metrics")


@pytest.mark.gen_test(timeout=60)
async def test_debug_needs_an_operator_token_behind_any_proxy_header(
    api: Api, sockets: Sockets, make_tenant: Callable[..., Tenant], gateway: Gateway
) -> None:
    alice, bob = make_tenant(), make_tenant()
    dialog_id = await api.site_dialog(alice)
    await sockets.open(sockets.site_url(alice, dialog_id))
    base = f"http://127.0.0.1:{gateway.port}"
    expired = security.issue_operator_token(alice.user_id, KEY, -60)
    remember(expired, "expired operator JWT")
    proxies = ({"X-Forwarded-For": "203.0.113.9"}, {"X-Real-IP": "203.0.113.9"},
               {"X-Real-IP": "127.0.0.1"}, {"X-Forwarded-For": "127.0.0.1, 10.0.0.1"})
    for path in (p.format(d=dialog_id) for p in DEBUG_PATHS):
        code, _ = await get_json(base + path)
        assert code == 200, path  # a direct loopback peer: no token needed
        for proxy in proxies:
            for auth in ({}, {"Authorization": "Bearer garbage"},
                         {"Authorization": f"Bearer {expired}"}):
                code, body = await get_json(base + path, **proxy, **auth)
                assert code == 401 and body == {"error": "an operator token is required"}, (
                    path, proxy, auth)
            code, _ = await get_json(base + path, **proxy, Authorization=f"Bearer {alice.token}")
            assert code == 200, path
        sep = "&" if "?" in path else "?"
        code, _ = await get_json(f"{base}{path}{sep}token={quote(alice.token)}", **proxies[0])
        assert code == 200, path

    code, status = await get_json(base + DEBUG_PATHS[0], Authorization=f"Bearer {bob.token}",
                             **proxies[0])
    assert code == 200 and status["dialogs"] == {} and status["connections"]["total"] == 0
    code, body = await get_json(base + DEBUG_PATHS[1].format(d=dialog_id),
                           Authorization=f"Bearer {bob.token}", **proxies[0])
    assert code == 404 and body == {"error": "dialog not found"}
    code, _ = await get_json(base + "/health", **proxies[0])
    assert code == 200  # health stays public: it holds no dialog data


def non_loopback_address() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.gen_test(timeout=60)
async def test_debug_from_another_address_needs_an_operator_token(
    api: Api, make_tenant: Callable[..., Tenant], settings: Settings, database_url: str
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    alice, bob = make_tenant(), make_tenant()
    dialog_id = await api.site_dialog(alice)
    gateway = Gateway(settings, database_url)
    await gateway.start(port=0, host=address)
    try:
        base = f"http://{address}:{gateway.port}"
        client = DialogClient(f"ws://{address}:{gateway.port}/ws/site/dialogs/{dialog_id}"
                              f"?site_token={quote(alice.site_token)}")
        await client.connect()
        for path in (p.format(d=dialog_id) for p in DEBUG_PATHS):
            code, _ = await get_json(base + path)
            assert code == 401, path
            code, _ = await get_json(base + path, Authorization=f"Bearer {alice.token}")
            assert code == 200, path
        code, status = await get_json(base + DEBUG_PATHS[0], Authorization=f"Bearer {alice.token}")
        assert status["dialogs"] == {str(dialog_id): {"admin": 0, "widget": 0, "site": 1}}
        code, status = await get_json(base + DEBUG_PATHS[0], Authorization=f"Bearer {bob.token}")
        assert status["dialogs"] == {}
        code, _ = await get_json(base + DEBUG_PATHS[1].format(d=dialog_id),
                            Authorization=f"Bearer {bob.token}")
        assert code == 404
        await client.close()
    finally:
        await gateway.stop()
