"""The gateway's own HTTP face (issue 16, items 6 and 9, gateway halves): no credential in
its access or error lines whatever shape it arrives in; ``/demo`` never redirects to the
host a request names; the demo pages carry a Content-Security-Policy and are framed only
where they are meant to be (the widget by its assistant's domains, nothing else at all).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse
from tornado.ioloop import IOLoop

from replyx.settings import Settings
from replyx_ops.stack import render_nginx_conf
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.fix_stack import free_port
from tests.raw_socket import RawSocket
from ws_gateway.app import STATIC_DIR, Gateway


def fragments(secret: str) -> list[str]:
    """Pieces of ``secret`` long enough to matter: any 12 characters in a row."""
    return [secret[i:i + 12] for i in range(0, len(secret) - 12, 4)]


@pytest.mark.gen_test(timeout=60)
async def test_no_shape_of_a_credential_reaches_the_gateway_log(
    api: Api, sockets: Sockets, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    site, jwt = quote(tenant.site_token), quote(tenant.token)
    paths = [
        f"/ws/site/dialogs/3%3Fsite_token%3D{site}",
        f"/ws/site/dialogs/3%3fsite_token%3d{site}&since=1",
        f"/ws/dialogs/{dialog_id}%3Ftoken%3D{jwt}",
        f"/ws/site/dialogs/{site}",
        f"/ws/nowhere/{site}",
        f"/ws/site/dialogs/{dialog_id}?{site}=1",
        f"/ws/widget/dialogs/{dialog_id}%23guest_token%3D{quote(guest)}",
    ]
    for name, value in (("site_token", site), ("token", jwt), ("guest_token", quote(guest))):
        route = {"site_token": f"/ws/site/dialogs/{dialog_id}",
                 "token": f"/ws/dialogs/{dialog_id}",
                 "guest_token": f"/ws/widget/dialogs/{dialog_id}"}[name]
        # The bad byte first, in the middle, last: Tornado quoted the first 40 bytes.
        for spoiled in (f"%ff{value}", f"{value[:10]}%ff{value[10:]}", f"{value}%ff"):
            paths.append(f"{route}?{name}={spoiled}")
    formatter = logging.Formatter("%(message)s")
    for path in paths:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            try:
                raw = await RawSocket.connect(sockets.base + path, origin=tenant.domains[0])
            except ConnectionError:
                pass  # refused before the upgrade (404): its access line is checked all the same
            else:
                await raw.close_code(timeout=10)
                raw.close()
            await _settle()
        lines = [formatter.format(record) for record in caplog.records]
        assert any(r.name == "replyx.access" for r in caplog.records), path
        for secret in (tenant.site_token, tenant.token, guest):
            for piece in fragments(secret):
                for line in lines:
                    assert piece not in line, (path, line[:300])


async def _settle() -> None:
    """Let the gateway write its lines for a connection that just ended."""
    await asyncio.sleep(0.05)


# -- /demo --------------------------------------------------------------------------------------


async def fetch(url: str, **headers: str) -> HTTPResponse:
    try:
        return await AsyncHTTPClient().fetch(url, headers=headers, follow_redirects=False)
    except HTTPClientError as exc:
        assert exc.response is not None
        return exc.response


@pytest.mark.gen_test(timeout=30)
async def test_demo_redirects_relatively_whatever_the_host_says(gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    for host in ("evil.example", "evil.example:666", f"127.0.0.1:{gateway.port}"):
        r = await fetch(f"{base}/demo", Host=host)
        assert r.code == 301 and r.headers["Location"] == "/demo/", (host, r.headers)


@pytest.fixture
def nginx(io_loop: IOLoop, gateway: Gateway, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx is not installed")
    port = free_port()
    conf = render_nginx_conf(Settings.from_environ({
        "REPLYX_DATA_DIR": str(tmp_path / "nginx-var"), "NGINX_PORT": str(port),
        "BACKEND_PORT": str(free_port()), "GATEWAY_PORT": str(gateway.port),
    }))
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(conf.parent), "-g",
                                "daemon off;"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest.mark.gen_test(timeout=30)
async def test_through_nginx_demo_redirects_relatively_too(nginx: str) -> None:
    for host in ("evil.example", "evil.example:666"):
        r = await fetch(f"{nginx}/demo", Host=host)
        assert r.code in (301, 302), r.code
        assert "evil" not in r.headers["Location"] and r.headers["Location"] == "/demo/", (
            r.headers["Location"])
    r = await fetch(f"{nginx}/demo/admin.html")
    assert r.code == 200 and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def inline_script_hashes(page: str) -> set[str]:
    html = (STATIC_DIR / page).read_bytes()
    return {"'sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode() + "'"
            for m in re.finditer(rb"<script>(.*?)</script>", html, re.S)}


def directives(csp: str) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in csp.split(";") if part.strip()}


@pytest.mark.gen_test(timeout=30)
async def test_demo_pages_carry_a_csp_and_only_the_widget_may_be_framed(
    gateway: Gateway, tenant: Tenant
) -> None:
    base = f"http://127.0.0.1:{gateway.port}/demo/"
    for page in ("", "index.html", "admin.html"):
        r = await fetch(base + page)
        assert r.code == 200, page
        assert r.headers["X-Frame-Options"] == "DENY", page
        csp = directives(r.headers["Content-Security-Policy"])
        assert csp["frame-ancestors"] == ["'none'"], page
        assert csp["default-src"] == ["'self'"] and csp["object-src"] == ["'none'"]
        # Inline scripts run by their hash only: no 'unsafe-inline', nothing injected runs.
        assert "'unsafe-inline'" not in csp["script-src"]
        assert inline_script_hashes(page or "index.html") <= set(csp["script-src"]), page

    # The widget: framed by its assistant's sites (and our own pages), by no one else.
    r = await fetch(f"{base}widget.html?assistant_id={tenant.assistant_id}")
    assert r.code == 200 and "X-Frame-Options" not in r.headers
    csp = directives(r.headers["Content-Security-Policy"])
    assert csp["frame-ancestors"] == ["'self'", *tenant.domains]
    assert inline_script_hashes("widget.html") <= set(csp["script-src"])
    for query in ("", "?assistant_id=999999", "?assistant_id=x", "?assistant_id=%ff"):
        r = await fetch(f"{base}widget.html{query}")
        assert r.code in (200, 400), query
        if r.code == 200:
            assert directives(r.headers["Content-Security-Policy"])["frame-ancestors"] == [
                "'self'"], query
    # Scripts and styles need no policy of their own.
    r = await fetch(base + "replyx.js")
    assert r.code == 200
