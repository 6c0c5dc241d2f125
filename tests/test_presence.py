"""Presence across gateways, shared through Postgres only.

Two gateways in this process on one database (each with its own lease and
rows), and one in a subprocess for the SIGKILL case. Short debounce and lease
settings keep the waits short; the rules are the same as the defaults'.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from tornado.ioloop import IOLoop

from replyx import security
from replyx.settings import Settings
from replyx_client import DialogClient, InboxClient
from replyx_ops.bench.measure import free_port
from tests.fix_apps import Api, Sockets, start_gateway
from tests.fix_db import TEST_JWT_SECRET, Tenant
from tests.net import get_json
from ws_gateway.app import Gateway

BIN = Path(sys.executable).parent


def presences(client: DialogClient) -> list[Any]:
    return [f.data for f in client.frames if f.data.get("type") == "presence"]


@pytest.fixture
def second(io_loop: IOLoop, settings: Settings, database_url: str) -> Iterator[Gateway]:
    gw = start_gateway(io_loop, settings, database_url)
    yield gw
    io_loop.run_sync(gw.stop, timeout=30)


def inbox_url(base: str, tenant: Tenant) -> str:
    return f"{base}/ws/inbox?token={quote(tenant.token)}"


@pytest.mark.gen_test(timeout=60)
async def test_operator_on_one_gateway_is_online_for_a_widget_on_another(
    api: Api, sockets: Sockets, gateway: Gateway, second: Gateway, tenant: Tenant,
    make_tenant: Any,
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    other = make_tenant()
    other_dialog, other_guest = await api.widget_dialog(other)
    base2 = f"ws://127.0.0.1:{second.port}"
    widget = await sockets.open(
        sockets.widget_url(tenant, dialog_id, guest).replace(sockets.base, base2),
        origin=tenant.domains[0])
    bystander = await sockets.open(
        sockets.widget_url(other, other_dialog, other_guest).replace(sockets.base, base2),
        origin=other.domains[0])
    await widget.wait_for_frame(lambda f: f.get("type") == "presence")
    assert presences(widget) == [{"type": "presence", "operators_online": 0}]

    inbox = InboxClient(inbox_url(sockets.base, tenant))  # on gateway 1
    sockets.clients.append(inbox)
    await inbox.connect()
    await widget.wait_until(lambda: presences(widget)[-1]["operators_online"] == 1, 5, "online")
    # The inbox sees its visitor on the page, though the widget is on the other gateway.
    await inbox.wait_until(lambda: inbox.dialogs[dialog_id]["visitor_online"], 5, "visitor")

    await inbox.close()
    await widget.wait_until(lambda: presences(widget)[-1]["operators_online"] == 0, 15,
                            "offline after the debounce")
    # Assistant isolation: the other tenant's widget never heard of any of it.
    assert presences(bystander) == [{"type": "presence", "operators_online": 0}]


@pytest.mark.gen_test(timeout=60)
async def test_a_widget_reload_is_no_offline_flap_for_the_operator(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    url = sockets.widget_url(tenant, dialog_id, guest)
    widget = await sockets.open(url, origin=tenant.domains[0])
    await admin.wait_until(
        lambda: presences(admin) and presences(admin)[-1]["visitor_online"], 5, "online")
    for _ in range(3):  # page navigations: close, and back within 2 s
        await widget.close()
        await asyncio.sleep(0.5)
        widget = await sockets.open(url, origin=tenant.domains[0])
    await asyncio.sleep(2.5)
    assert [p["visitor_online"] for p in presences(admin)] == [False, True]


CHURN_WIDGETS = 500
CHURN_SECONDS = 30


def at_most_one_presence_a_second(client: DialogClient, lateness: float = 0.0) -> list[float]:
    """The gaps under 0.9 s between two presence frames of one socket (none expected).

    ``lateness``: how late this process's event loop ran at worst. The clients and the
    gateways share it, so a frame sent on time can be read that much later than the next
    one; a gap shorter by that much is the reading's jitter, not two frames within a second.
    """
    frames = [f for f in client.frames if f.data.get("type") == "presence"]
    return [round(b.received_at - a.received_at, 3) for a, b in itertools.pairwise(frames)
            if b.received_at - a.received_at < 0.9 - lateness]


class Lateness:
    """The worst delay of this process's event loop while it runs (a 20 ms ticker's overshoot)."""

    TICK = 0.02

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.TICK)
            self.worst = max(self.worst, time.monotonic() - started - self.TICK)

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


@pytest.mark.gen_test(timeout=180)
async def test_500_widgets_churning_for_30_s_are_coalesced_and_the_final_counts_exact(
    sockets: Sockets, gateway: Gateway, second: Gateway, tenant: Tenant,
    sql: psycopg.Connection[Any],
) -> None:
    """500 visitors arrive and leave for 30 s over two gateways while six operators come and
    five go: no socket gets more than one presence frame a second, and afterwards both
    gateways' status endpoints count exactly the sockets still open."""
    guests = [security.new_guest_token() for _ in range(CHURN_WIDGETS)]
    dialogs = [int(row[0]) for row in sql.execute(
        "INSERT INTO dialogs (assistant_id, channel, guest_token_hash)"
        " SELECT %s, 'widget', h FROM unnest(%s::text[]) WITH ORDINALITY t(h, n)"
        " ORDER BY n RETURNING id",
        (tenant.assistant_id, [security.token_hash(g) for g in guests])).fetchall()]
    bases = [sockets.base, f"ws://127.0.0.1:{second.port}"]
    # Watchers on both gateways: site sockets (operators online), admin sockets of ten
    # churning dialogs (their visitor online or not).
    watchers = [await sockets.open(sockets.site_url(tenant, dialogs[0]).replace(
        sockets.base, base)) for base in bases]
    watchers += [await sockets.open(sockets.admin_url(tenant, d).replace(
        sockets.base, bases[i % 2])) for i, d in enumerate(dialogs[:10])]
    churned: list[DialogClient] = []
    operators: list[InboxClient] = []
    rng = random.Random(11)

    async def visitor(i: int) -> None:
        url = sockets.widget_url(tenant, dialogs[i], guests[i]).replace(
            sockets.base, bases[i % 2])
        deadline = time.monotonic() + CHURN_SECONDS
        await asyncio.sleep(rng.uniform(0, 3))
        while time.monotonic() < deadline:
            client = DialogClient(url, origin=tenant.domains[0], resume=False)
            churned.append(client)
            await client.connect()
            await asyncio.sleep(rng.uniform(1, 5))  # on the page
            await client.close()
            await asyncio.sleep(rng.uniform(0.2, 8))  # away: some past the debounce

    async def operators_come_and_go() -> None:
        for _ in range(6):
            inbox = InboxClient(inbox_url(bases[len(operators) % 2], tenant))
            await inbox.connect()
            operators.append(inbox)
            await asyncio.sleep(3)
        for inbox in operators[:-1]:
            await inbox.close()

    lateness = Lateness()
    await asyncio.gather(operators_come_and_go(), *(visitor(i) for i in range(CHURN_WIDGETS)))
    await asyncio.sleep(7)  # the debounce, then the last frames
    worst = lateness.stop()
    assert len(churned) > 2 * CHURN_WIDGETS
    # Each visitor left by itself: no socket was closed by a gateway.
    assert {code for client in churned for code in client.close_codes} <= {None}
    for client in [*watchers, *churned]:
        assert at_most_one_presence_a_second(client, worst) == [], (client.url.split("?")[0], worst)
    for watcher in watchers[:2]:
        assert presences(watcher)[-1]["operators_online"] == 1  # one inbox is still open
    for watcher in watchers[2:]:
        assert presences(watcher)[-1]["visitor_online"] is False  # every visitor left
    # Every gateway's view equals the sockets actually open: no visitor, one operator.
    for gw in (gateway, second):
        code, status = await get_json(f"http://127.0.0.1:{gw.port}/api/debug/websocket/status")
        assert code == 200
        assert status["connections"]["widget"] == 0
        online = status["presence"]["online"]
        assert (online["visitors"], online["operators"]) == (0, 1), status["presence"]
    await operators[-1].close()


@pytest.mark.gen_test(timeout=90)
async def test_a_killed_gateway_stops_counting_within_15_seconds(
    api: Api, sockets: Sockets, tenant: Tenant, database_url: str, tmp_path: Path
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "GATEWAY_PORT": str(port),
           "REPLYX_DATA_DIR": str(tmp_path), "REPLYX_JWT_SECRET": TEST_JWT_SECRET}
    proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the test waits for its port)
        [str(BIN / "python"), "-m", "ws_gateway"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        inbox = InboxClient(inbox_url(f"ws://127.0.0.1:{port}", tenant), resume=False)
        deadline = time.monotonic() + 30
        while True:
            try:
                await inbox.connect()
                break
            except Exception:
                assert time.monotonic() < deadline, "the second gateway did not start"
                await asyncio.sleep(0.3)
        await widget.wait_until(lambda: presences(widget)[-1]["operators_online"] == 1, 5, "on")
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await widget.wait_until(lambda: presences(widget)[-1]["operators_online"] == 0, 20, "off")
        assert time.monotonic() - killed_at < 15
    finally:
        proc.kill()
        proc.wait()
