"""Floods that stay inside every per-socket limit (issue 16, item 4): one address gets a
handshake rate (refusals close 1013, cost no database query and take at most a burst of
log lines, then one a second, while the counters count them all), and a frame budget
across all its sockets, so many sockets each under its own rate cannot flood the event
loop together. A bystander on another address keeps its timely delivery meanwhile.

The attacker comes through a loopback proxy (``X-Real-IP``), as every client behind nginx
does; a direct caller on this host is not held to per-address rates.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

import pytest

from replyx.settings import Settings
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant, make_settings
from tests.raw_socket import TEXT, RawSocket
from ws_gateway.app import Gateway

HANDSHAKES_PER_SECOND, HANDSHAKE_BURST = 5, 30
FRAMES_PER_SECOND, FRAME_BURST = 50, 100
#: Generous (backend, gateway and every client share one event loop here); before, a flood of
#: refused handshakes took its connect-to-ready to ~350 ms and pings its delivery to 428 ms.
TIMELY = 1.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path / "var",
        REPLYX_HANDSHAKE_RATE=str(HANDSHAKES_PER_SECOND),
        REPLYX_HANDSHAKE_BURST=str(HANDSHAKE_BURST),
        REPLYX_ADDRESS_FRAME_RATE=str(FRAMES_PER_SECOND),
        REPLYX_ADDRESS_FRAME_BURST=str(FRAME_BURST),
    )


async def delivery_times(api: Api, sockets: Sockets, tenant: Tenant, dialog_id: int,
                         stop: asyncio.Event) -> list[float]:
    """A bystander's post-to-frame times, one message every 50 ms until ``stop``."""
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    times: list[float] = []
    while not stop.is_set():
        started = time.monotonic()
        posted = await api.post_site(tenant, dialog_id, "bystander")
        await client.wait_for_seq(posted["seq"])
        times.append(time.monotonic() - started)
        await asyncio.sleep(0.05)
    assert client.close_codes == [] and client.gaps == 0 and client.duplicates == 0
    return times


@pytest.mark.gen_test(timeout=120)
async def test_a_handshake_flood_is_refused_cheaply_and_logged_sparingly(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dialog_id, _ = await api.widget_dialog(tenant)
    bystander_dialog = await api.site_dialog(tenant)
    attacker = {"X-Real-IP": "203.0.113.7"}
    codes: list[int | None] = []

    async def attempt() -> None:
        # A random guest token each time: without a rate, each one cost a database query.
        url = sockets.widget_url(tenant, dialog_id, "rxg_" + secrets.token_urlsafe(32))
        raw = await RawSocket.connect(url, origin=tenant.domains[0], headers=attacker)
        try:
            codes.append(await raw.close_code(timeout=10))
        finally:
            raw.close()

    stop = asyncio.Event()
    bystander = asyncio.ensure_future(
        delivery_times(api, sockets, tenant, bystander_dialog, stop))
    started = time.monotonic()
    connects: list[float] = []
    for _ in range(20):  # 20 rounds of 20 at once: 400 refused handshakes
        await asyncio.gather(*(attempt() for _ in range(20)))
        t = time.monotonic()
        joined = await sockets.open(sockets.site_url(tenant, bystander_dialog))
        connects.append(time.monotonic() - t)
        await joined.close()
    elapsed = time.monotonic() - started
    stop.set()
    times = await bystander

    allowed = HANDSHAKE_BURST + HANDSHAKES_PER_SECOND * elapsed + 1
    assert codes.count(4001) <= allowed, (codes.count(4001), allowed)
    # The handshake rate answers 1013 (back off and retry), not the fatal 1008.
    assert codes.count(1013) >= len(codes) - allowed and set(codes) <= {4001, 1013}
    assert gateway.stats.refused["1013"] + gateway.stats.refused["4001"] == 400
    refusals = [r for r in caplog.records
                if r.name == "ws_gateway.sockets" and "203.0.113.7" in r.getMessage()]
    assert len(refusals) <= 10 + elapsed + 1, len(refusals)
    assert max(connects) < TIMELY and max(times) < TIMELY, (max(connects), max(times))


@pytest.mark.gen_test(timeout=120)
async def test_an_address_frame_budget_spans_its_sockets_and_bystanders_stay_timely(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway
) -> None:
    attack_dialog = await api.site_dialog(tenant)
    bystander_dialog = await api.site_dialog(tenant)
    attacker = {"X-Real-IP": "203.0.113.8"}
    raws = []
    for _ in range(20):
        raw = await RawSocket.connect(sockets.site_url(tenant, attack_dialog), headers=attacker)
        await raw.read_json("ready")
        raws.append(raw)
    ping = raws[0].frame_bytes(TEXT, b'{"type":"ping"}')

    async def flood(raw: RawSocket) -> None:
        # 15 frames a second: under the per-socket rate (20/s); 20 sockets make 300/s.
        for _ in range(45):
            await raw.send_many([ping])
            await asyncio.sleep(1 / 15)

    stop = asyncio.Event()
    bystander = asyncio.ensure_future(
        delivery_times(api, sockets, tenant, bystander_dialog, stop))
    await asyncio.gather(*(flood(raw) for raw in raws))
    stop.set()
    times = await bystander
    survivors = len(gateway.router.sockets_of(attack_dialog))
    for raw in raws:
        raw.close()

    # The address's budget (50 frames/s) holds about three 15/s sockets; the rest were closed.
    assert 1 <= survivors <= FRAMES_PER_SECOND // 15 + 1, survivors
    assert gateway.stats.refused["1008"] >= 20 - survivors
    assert max(times) < TIMELY, max(times)
