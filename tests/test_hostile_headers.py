"""Smaller findings of issue 16, item 9, on the backend: a huge ``Origin`` is neither echoed nor
logged whole; the worker's PID is shown only to a caller on this host; a validly signed operator
JWT with an absurd lifetime or mistyped claims is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from tornado.ioloop import IOLoop

from replyx import security
from replyx.settings import ConfigError, Settings
from replyx_ops.stack import render_nginx_conf
from tests.fix_apps import Api
from tests.fix_db import TEST_JWT_SECRET, Tenant
from tests.fix_secrets import remember
from tests.fix_stack import free_port

HUGE_ORIGIN = "https://" + "a" * 7800 + ".example"
PROXIED = {"X-Real-IP": "203.0.113.77"}


@pytest.mark.gen_test(timeout=60)
async def test_a_huge_origin_is_neither_echoed_nor_logged_whole(
    api: Api, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    calls: list[tuple[str, str, Any, str | None]] = [
        ("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id}, None),
        ("OPTIONS", "/api/widget/dialogs", None, None),
        ("POST", f"/api/widget/dialogs/{dialog_id}/messages", {"text": "x"}, guest),
        ("POST", f"/api/widget/dialogs/{dialog_id}/typing", None, guest),
        ("OPTIONS", f"/api/widget/dialogs/{dialog_id}/messages", None, None),
    ]
    for method, path, body, token in calls:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            r = await api.request(method, path, body, token=token,
                                  headers={"Origin": HUGE_ORIGIN, **PROXIED})
        assert r.code in (204, 403), (path, r.code)
        # nginx answered 502 when the reflected Origin overflowed its buffer for the
        # upstream's headers: nothing of it comes back now.
        assert "Access-Control-Allow-Origin" not in r.headers, path
        assert sum(len(k) + len(v) for k, v in r.headers.get_all()) < 1024, path
        for record in caplog.records:
            assert len(record.getMessage()) < 400, (path, record.getMessage()[:200])


@pytest.mark.gen_test(timeout=60)
async def test_the_worker_pid_is_shown_only_to_a_caller_on_this_host(api: Api) -> None:
    direct = await api.request("GET", "/health")
    assert direct.headers["X-Replyx-Worker"] == str(os.getpid())
    assert direct.body["worker"] == str(os.getpid())
    names = set()
    for headers in (PROXIED, {"X-Forwarded-For": "203.0.113.78"}, {"X-Real-IP": "127.0.0.1"}):
        for path in ("/health", "/api/dialogs", "/api/nowhere"):
            r = await api.request("GET", path, headers=headers)
            worker = r.headers["X-Replyx-Worker"]
            assert not worker.isdigit() and str(os.getpid()) not in worker, (path, worker)
            names.add(worker)
            if path == "/health":
                assert r.body["worker"] == worker
    assert len(names) == 1  # one worker, one name: replyx check can still tell workers apart


def signed(claims: dict[str, Any]) -> str:
    token = jwt.encode(claims, TEST_JWT_SECRET.encode(), algorithm="HS256")
    remember(token, "hand-made operator JWT")
    return token


@pytest.mark.gen_test(timeout=60)
async def test_signed_tokens_with_absurd_lifetimes_or_mistyped_claims_are_refused(
    api: Api, tenant: Tenant
) -> None:
    now = int(time.time())
    base = {"sub": str(tenant.user_id), "iss": "replyx", "aud": "replyx-operator", "iat": now,
            "exp": now + 3600}
    week = security.DEFAULT_MAX_LIFETIME
    refused = {
        "exp 10^30": {**base, "exp": 10**30},
        "exp as a string": {**base, "exp": str(now + 3600)},
        "exp as a float string": {**base, "exp": f"{now + 3600}.0"},
        "exp true": {**base, "exp": True},
        "iat as a string": {**base, "iat": str(now)},
        "iat in the future": {**base, "iat": now + 3600, "exp": now + 7200},
        "no iat": {k: v for k, v in base.items() if k != "iat"},
        "lifetime over a week": {**base, "exp": now + week + 60},
        "old iat, exp far ahead": {**base, "iat": now - 60, "exp": now + week},
        "sub as a number": {**base, "sub": tenant.user_id},
        "sub with spaces": {**base, "sub": f" {tenant.user_id}"},
    }
    for name, claims in refused.items():
        r = await api.request("GET", "/api/dialogs", token=signed(claims))
        assert r.code == 401, (name, r.code)
        with pytest.raises(security.InvalidTokenError):
            security.verify_operator_token(signed(claims), TEST_JWT_SECRET.encode())
    accepted = {
        "an hour": base,
        "a week": {**base, "exp": now + week},
        "iat a little ahead (clock skew)": {**base, "iat": now + 10},
    }
    for name, claims in accepted.items():
        r = await api.request("GET", "/api/dialogs", token=signed(claims))
        assert r.code == 200, (name, r.code, r.body)
    # A shorter maximum is the caller's to choose.
    with pytest.raises(security.InvalidTokenError):
        security.verify_operator_token(signed(base), TEST_JWT_SECRET.encode(), max_lifetime=60)


def test_the_issued_lifetime_must_fit_the_maximum(tmp_path: Path) -> None:
    env = {"REPLYX_DATA_DIR": str(tmp_path), "REPLYX_JWT_TTL": "700000"}
    with pytest.raises(ConfigError, match="REPLYX_JWT_TTL=700000 is longer than"):
        Settings.from_environ(env)
    settings = Settings.from_environ({**env, "REPLYX_JWT_MAX_LIFETIME": "700000"})
    assert settings.jwt_max_lifetime == 700000


# -- through nginx (conf/nginx.conf in front of the in-process backend) --------------------------


@pytest.fixture
def nginx_api(io_loop: IOLoop, api: Api, tmp_path: Path) -> Iterator[Api]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx is not installed")
    port = free_port()
    backend_port = api.base.rsplit(":", 1)[1]
    settings = Settings.from_environ({
        "REPLYX_DATA_DIR": str(tmp_path / "nginx-var"), "NGINX_PORT": str(port),
        "BACKEND_PORT": backend_port, "GATEWAY_PORT": str(free_port()),
    })
    conf = render_nginx_conf(settings)
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(conf.parent), "-g",
                                "daemon off;"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield Api(base)
    process.terminate()
    process.wait(10)


@pytest.mark.gen_test(timeout=60)
async def test_through_nginx_a_huge_origin_gets_no_502_and_no_pid_shows(
    nginx_api: Api, tenant: Tenant
) -> None:
    dialog_id, guest = await nginx_api.widget_dialog(tenant)
    for size in (7800, 20000):
        origin = "https://" + "a" * size + ".example"
        for method, path, body in (
            ("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id}),
            ("POST", f"/api/widget/dialogs/{dialog_id}/messages", {"text": "x"}),
            ("OPTIONS", "/api/widget/dialogs", None),
        ):
            r = await nginx_api.request(method, path, body, token=guest,
                                        headers={"Origin": origin})
            assert r.code in (204, 400, 403), (size, path, r.code)
            if r.code != 204:
                assert set(r.body) == {"error"}, (size, path, r.body)
    for path in ("/health", "/api/dialogs"):
        r = await nginx_api.request("GET", path)
        worker = r.headers["X-Replyx-Worker"]
        assert not worker.isdigit() and str(os.getpid()) not in worker, (path, worker)
        if path == "/health":
            assert str(os.getpid()) not in str(r.body), r.body
