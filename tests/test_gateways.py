"""Several gateways behind nginx (REPLYX_GATEWAYS=N) on the real stack: sockets spread over
them, one killed mid-stream, a rolling `replyx ctl restart gateway`; every socket against
the database."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
import pytest

from replyx_client import DialogClient
from tests.consistency import Poster, assert_match_database
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.fix_stack import Stack
from tests.net import get_json, get_text

log = logging.getLogger(__name__)
KINDS = ("admin", "widget", "site")
#: Every socket comes through nginx from 127.0.0.1: one client address, whose handshake
#: limit (REPLYX_HANDSHAKE_RATE / _BURST) would refuse a whole gateway's sockets resuming.
ONE_ADDRESS = {"REPLYX_HANDSHAKE_RATE": "1000", "REPLYX_HANDSHAKE_BURST": "1000"}

Placement = dict[tuple[int, str], str]


def gateway_ports(stack: Stack, n: int) -> dict[str, int]:
    return {f"gateway-{i + 1}": stack.gateway_port + i for i in range(n)}


async def placement(stack: Stack, n: int) -> tuple[Placement, dict[str, int]]:
    """Which gateway holds each (dialog, kind) socket, from each gateway's debug status."""
    where: Placement = {}
    totals: dict[str, int] = {}
    for name, port in gateway_ports(stack, n).items():
        code, status = await get_json(f"http://127.0.0.1:{port}/api/debug/websocket/status")
        assert code == 200, status
        assert status["gateway"] == name
        totals[name] = status["connections"]["total"]
        for dialog_id, kinds in status["dialogs"].items():
            for kind in KINDS:
                if kinds[kind]:
                    assert kinds[kind] == 1, (dialog_id, kinds)
                    where[(int(dialog_id), kind)] = name
    return where, totals


async def open_dialogs(
    stack: Stack, tenant: Tenant, count: int, **client: Any
) -> tuple[Sockets, dict[tuple[int, str], DialogClient]]:
    """``count`` widget dialogs with an admin, a widget and a site socket each, through nginx."""
    api = Api(stack.api)
    sockets = Sockets(stack.nginx.replace("http://", "ws://"))
    dialogs = [await api.widget_dialog(tenant) for _ in range(count)]
    clients: dict[tuple[int, str], DialogClient] = {}
    for dialog_id, guest in dialogs:
        # One at a time: least_conn then spreads them evenly.
        clients[(dialog_id, "admin")] = await sockets.open(
            sockets.admin_url(tenant, dialog_id), **client)
        clients[(dialog_id, "widget")] = await sockets.open(
            sockets.widget_url(tenant, dialog_id, guest), origin=tenant.domains[0], **client)
        clients[(dialog_id, "site")] = await sockets.open(
            sockets.site_url(tenant, dialog_id), **client)
    return sockets, clients


def sql_poster(database_url: str, dialog_ids: list[int], rate: float) -> tuple[Poster, Any]:
    """Inserts from psql's point of view (any writer), round robin over the dialogs."""
    conn: dict[str, psycopg.AsyncConnection[Any]] = {}

    async def post(i: int) -> int:
        if "c" not in conn:
            conn["c"] = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        await conn["c"].execute(
            "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'system', %s)",
            (dialog_ids[i % len(dialog_ids)], f"message {i}"))
        return 201

    async def close() -> None:
        if "c" in conn:
            await conn["c"].close()

    return Poster(post, rate), close


def down(client: DialogClient) -> bool:
    """Closed since its last connect: reconnecting."""
    return len(client.close_codes) >= client.connects


@pytest.mark.gen_test(timeout=300)
async def test_three_gateways_share_sockets_and_a_killed_one_costs_only_its_own(
    make_stack: Callable[..., Stack], tenant: Tenant, database_url: str
) -> None:
    stack = make_stack("--no-demo", REPLYX_GATEWAYS="3", **ONE_ADDRESS)
    assert "gateway-3" in stack.run_output()
    # replyx check: one line per gateway, all pass.
    result = await asyncio.get_running_loop().run_in_executor(
        None, stack.cli, "check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = {c["name"]: c for c in orjson.loads(result.stdout)["checks"]}
    for name in ("gateway-1", "gateway-2", "gateway-3"):
        assert report[f"{name} health"]["status"] == "pass", report
        assert report[f"{name} process"]["status"] == "pass", report
    # (Another module's stack may LISTEN on the shared test database too: counted apart.)
    assert "all 3 gateways received our NOTIFY" in report["gateway listener"]["detail"]
    status = stack.ctl("status")
    assert all(f"gateway:gateway-{i}" in status for i in (1, 2, 3)), status

    sockets, clients = await open_dialogs(stack, tenant, 100)
    where, totals = await placement(stack, 3)
    assert len(where) == 300 and sum(totals.values()) == 300
    log.warning("spread over three gateways: %s", totals)
    assert all(80 <= n <= 120 for n in totals.values()), totals

    dialog_ids = sorted({d for d, _ in clients})
    poster, close = sql_poster(database_url, dialog_ids, rate=60.0)
    poster.start()
    await poster.wait_created(120)
    victim = int(stack.ctl("pid", "gateway:gateway-2").strip())
    os.kill(victim, signal.SIGKILL)
    killed_at = poster.created
    await poster.wait_created(killed_at + 240, timeout=60)
    await poster.stop()
    await close()

    for dialog_id in dialog_ids:
        await assert_match_database(
            database_url, dialog_id, [clients[(dialog_id, k)] for k in KINDS], timeout=60)
    movers = {key for key, name in where.items() if name == "gateway-2"}
    for key, client in clients.items():
        if key in movers:
            assert client.connects >= 2, (key, client.close_codes)
        else:  # the other gateways' sockets never noticed
            assert client.connects == 1 and client.close_codes == [], (key, client.close_codes)
    after, totals_after = await placement(stack, 3)
    assert len(after) == 300, totals_after
    elsewhere = sum(after[key] != "gateway-2" for key in movers)
    log.warning("after the kill: %s; %d of %d moved sockets on the other gateways",
                totals_after, elsewhere, len(movers))
    # Where its clients resume is nginx's choice, and a race: nginx skips the dead gateway
    # for fail_timeout (10 s) once a connection to it failed, but supervisord restarts it
    # within a second or two, and a restarted, empty gateway is least_conn's first pick.
    # On a loaded machine the clients' retries came after the restart and 98 of 100 went
    # back to it (CI, 2026-11-28), so where they land is logged, not asserted; what is
    # asserted above is that each one resumed and lost nothing.

    # Each gateway names itself in its metrics and its own log file.
    code, metrics = await get_text(f"http://127.0.0.1:{stack.gateway_port + 2}/metrics")
    assert code == 200 and 'replyx_gateway_info{gateway="gateway-3"} 1.0' in metrics
    assert "[gateway-1 " in stack.log("gateway-1") and "[gateway-3 " in stack.log("gateway-3")
    await sockets.close_all()


@pytest.mark.gen_test(timeout=300)
async def test_rolling_restart_of_two_gateways_moves_at_most_half_and_loses_nothing(
    make_stack: Callable[..., Stack], tenant: Tenant, database_url: str
) -> None:
    stack = make_stack("--no-demo", REPLYX_GATEWAYS="2", **ONE_ADDRESS)
    # Clients that wait out a gateway's restart (~3 s) before their first retry after 1012
    # come back to it (least_conn) instead of piling onto the other one.
    sockets, clients = await open_dialogs(stack, tenant, 40, backoff_initial=6.0)
    _, totals = await placement(stack, 2)
    assert totals == {"gateway-1": 60, "gateway-2": 60}, totals
    dialog_ids = sorted({d for d, _ in clients})
    poster, close = sql_poster(database_url, dialog_ids, rate=40.0)
    poster.start()
    await poster.wait_created(40)

    most_down = 0
    sampling = True

    async def sample() -> None:
        nonlocal most_down
        while sampling:
            most_down = max(most_down, sum(down(c) for c in clients.values()))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    started = time.monotonic()
    out = await asyncio.get_running_loop().run_in_executor(
        None, lambda: stack.cli("ctl", "restart", "gateway"))
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.index("gateway:gateway-1") < out.stderr.index("gateway:gateway-2")
    await poster.wait_created(poster.created + 80, timeout=60)
    await poster.stop()
    await close()
    for dialog_id in dialog_ids:
        await assert_match_database(
            database_url, dialog_id, [clients[(dialog_id, k)] for k in KINDS], timeout=60)
    sampling = False
    await sampler
    log.warning("rolling restart of 2 gateways took %.1fs; at most %d of 120 sockets"
                " reconnecting at once", took, most_down)
    assert all(c.connects == 2 for c in clients.values()), [
        (k, c.close_codes) for k, c in clients.items() if c.connects != 2]
    assert all(c.close_codes == [1012] for c in clients.values())
    assert most_down <= 60, most_down
    _, totals = await placement(stack, 2)
    assert sum(totals.values()) == 120, totals
    await sockets.close_all()
