"""Gateways on several hosts, simulated on this one as the README lays it out: each gateway a
separate `python -m ws_gateway` with its own data dir, port and name, one Postgres, one nginx
rendered from conf/nginx.conf with the gateways' addresses as its upstream."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replyx_ops.stack import nginx_available, render_nginx_conf
from tests.consistency import assert_match_database
from tests.fix_apps import Api, Sockets
from tests.fix_db import TEST_JWT_SECRET, Tenant, child_environ, make_settings
from tests.net import free_port, get_json, http_status, wait_http
from tests.test_gateways import KINDS, sql_poster

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def process(argv: list[str], log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=child_environ(**env), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.mark.gen_test(timeout=180)
async def test_gateways_on_two_hosts_behind_one_nginx(
    tmp_path: Path, database_url: str, tenant: Tenant, api: Api
) -> None:
    assert nginx_available(), "nginx is not installed: apt-get install nginx-light"
    hosts = {"gateway-a": free_port(), "gateway-b": free_port()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with contextlib.ExitStack() as running:
        for name, port in hosts.items():
            # What each gateway host runs: its own data dir and name, the shared key and database.
            data_dir = tmp_path / name
            data_dir.mkdir()
            procs[name] = running.enter_context(process(
                [str(BIN / "python"), "-m", "ws_gateway"], data_dir / "gateway.log",
                DATABASE_URL=database_url, REPLYX_DATA_DIR=str(data_dir),
                REPLYX_JWT_SECRET=TEST_JWT_SECRET, GATEWAY_PORT=str(port),
                REPLYX_GATEWAY_NAME=name, REPLYX_HOST="127.0.0.1"))
        for port in hosts.values():
            wait_http(f"http://127.0.0.1:{port}/health", timeout=60)

        # The front host: conf/nginx.conf rendered with the gateways' addresses.
        front = make_settings(tmp_path / "front", NGINX_PORT=str(free_port()))
        conf = render_nginx_conf(front, [f"127.0.0.1:{port}" for port in hosts.values()])
        assert all(f"server 127.0.0.1:{port} " in conf.read_text() for port in hosts.values())
        running.enter_context(process(
            ["/usr/sbin/nginx", "-e", "stderr", "-p", str(conf.parent), "-c", str(conf),
             "-g", "daemon off;"], tmp_path / "nginx.log"))
        sockets = Sockets(f"ws://127.0.0.1:{front.nginx_port}")
        deadline = time.monotonic() + 30
        while http_status(f"http://127.0.0.1:{front.nginx_port}/ws/health") is None:
            assert time.monotonic() < deadline, (tmp_path / "nginx.log").read_text()
            await asyncio.sleep(0.1)

        dialogs = [await api.widget_dialog(tenant) for _ in range(10)]
        clients = {}
        for dialog_id, guest in dialogs:
            clients[(dialog_id, "admin")] = await sockets.open(
                sockets.admin_url(tenant, dialog_id))
            clients[(dialog_id, "widget")] = await sockets.open(
                sockets.widget_url(tenant, dialog_id, guest), origin=tenant.domains[0])
            clients[(dialog_id, "site")] = await sockets.open(sockets.site_url(tenant, dialog_id))
        totals, on_a = {}, set()
        for name, port in hosts.items():
            code, status = await get_json(f"http://127.0.0.1:{port}/api/debug/websocket/status")
            assert code == 200 and status["gateway"] == name
            totals[name] = status["connections"]["total"]
            if name == "gateway-a":
                on_a = {(int(d), k) for d, kinds in status["dialogs"].items()
                        for k in KINDS if kinds[k]}
        assert totals == {"gateway-a": 15, "gateway-b": 15}, totals

        dialog_ids = [d for d, _ in dialogs]
        poster, close = sql_poster(database_url, dialog_ids, rate=40.0)
        poster.start()
        await poster.wait_created(40)
        # One host goes away (its gateway stops: 1012); its clients resume on the other.
        procs["gateway-a"].terminate()
        await asyncio.get_running_loop().run_in_executor(None, procs["gateway-a"].wait, 15)
        await poster.wait_created(poster.created + 80)
        await poster.stop()
        await close()
        for dialog_id in dialog_ids:
            await assert_match_database(
                database_url, dialog_id, [clients[(dialog_id, k)] for k in KINDS], timeout=60)
        for key, client in clients.items():
            assert client.connects == (2 if key in on_a else 1), (key, client.close_codes)
        code, status = await get_json(
            f"http://127.0.0.1:{hosts['gateway-b']}/api/debug/websocket/status")
        assert status["connections"]["total"] == 30, status["connections"]
        await sockets.close_all()
