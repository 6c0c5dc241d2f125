"""The real stack of `replyx run`: supervisord, gunicorn with 4 workers, the gateway, Postgres."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import psycopg
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from replyx.pg import EmbeddedPostgres
from replyx.protocol import LISTENER_APPLICATION
from replyx_client import DialogClient
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.fix_stack import Stack
from tests.net import http_status


@pytest.mark.gen_test(timeout=90)
async def test_burst_of_60_lands_on_several_workers_and_arrives_in_order(
    stack: Stack, tenant: Tenant
) -> None:
    api = Api(stack.api)
    sockets = Sockets(stack.ws)
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    site = await sockets.open(sockets.site_url(tenant, dialog_id))

    # One connection per request, all at once, so gunicorn spreads them over its workers.
    http = AsyncHTTPClient(force_instance=True, max_clients=60)

    async def post(i: int) -> tuple[str, dict[str, Any]]:
        response = await http.fetch(HTTPRequest(
            f"{stack.api}/api/widget/dialogs/{dialog_id}/messages", method="POST",
            body=orjson.dumps({"text": f"burst {i}"}),
            headers={"Authorization": f"Bearer {guest}", "Connection": "close"},
        ))
        return response.headers["X-Replyx-Worker"], orjson.loads(response.body)

    results = await asyncio.gather(*(post(i) for i in range(60)))
    http.close()
    workers = Counter(worker for worker, _ in results)
    assert len(workers) >= 2, f"all 60 POSTs landed on one worker: {workers}"
    stored = sorted((m for _, m in results), key=lambda m: m["seq"])
    assert [m["seq"] for m in stored] == list(range(1, 61))

    for client in (admin, widget, site):
        await client.wait_for_seq(60, timeout=30)
        assert client.messages == stored
        assert client.duplicates == 0 and client.gaps == 0
    await sockets.close_all()


@pytest.mark.gen_test(timeout=60)
async def test_cli_prints_json_and_its_token_opens_a_socket(stack: Stack) -> None:
    r = stack.cli("create-user", "cli-user@example.com", "--password", "correct horse")
    assert r.returncode == 0, r.stderr
    user_id = orjson.loads(r.stdout)["user_id"]
    r = stack.cli("create-user", "cli-user@example.com", "--password", "correct horse")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = stack.cli("create-assistant", "--user-id", str(user_id), "--name", "Shop",
                  "--domain", "shop.example", "--domain", "http://localhost:3000")
    assert r.returncode == 0, r.stderr
    created = orjson.loads(r.stdout)
    assert created["domains"] == ["https://shop.example", "http://localhost:3000"]
    assert created["site_token"].startswith("rxs_")
    r = stack.cli("token", "--user-id", str(user_id))
    assert r.returncode == 0
    token = r.stdout.strip()
    assert stack.cli("token", "--user-id", "99999999").returncode == 1

    api = Api(stack.api)
    login = await api.request("POST", "/api/auth/login",
                              {"email": "cli-user@example.com", "password": "correct horse"})
    assert login.code == 200
    site = await api.request("POST", f"/api/site/dialogs?site_token={created['site_token']}")
    dialog_id = site.body["dialog_id"]
    client = DialogClient(f"{stack.ws}/ws/dialogs/{dialog_id}?token={token}")
    await client.connect()
    await client.close()


def test_replyx_run_uses_the_embedded_database_by_default(make_stack: Any) -> None:
    """No DATABASE_URL: `replyx run` starts Postgres under the data dir, and stops it on exit."""
    stack: Stack = make_stack(embedded=True)
    embedded = EmbeddedPostgres(stack.data_dir)
    assert embedded.is_running()
    # And the stack uses it: the gateway's LISTEN session is on that server. (Checked: with
    # the stack's gateway sent to the test database by REPLYX_LISTEN_DATABASE_URL, this
    # fails, while the old check, DATABASE_URL absent from an env the fixture had stripped
    # of it, passed.)
    with psycopg.connect(embedded.url(), autocommit=True) as conn:
        sessions = conn.execute("SELECT application_name FROM pg_stat_activity").fetchall()
    assert (LISTENER_APPLICATION,) in sessions, sessions
    output = stack.run_output()
    assert "ReplyX realtime is up." in output
    assert "wscat -c" in output and "curl -X POST" in output
    for name in ("backend", "gateway", "supervisord"):
        assert (stack.data_dir / "log" / f"{name}.log").exists(), name
    ps = stack.ctl("status")
    assert "backend" in ps and "gateway" in ps and "RUNNING" in ps
    assert stack.stop() == 0
    assert http_status(stack.api + "/health") is None
    assert http_status(stack.gateway + "/health") is None
    assert not embedded.is_running()
