"""One anonymous visitor must not be able to hold the gateway's slots or sockets (issue 16,
items 2 and 3): every failed handshake gives its slot back with a close code, a socket that
reads nothing is closed 4008 whatever it sends, an unfinished message has a deadline (1008).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import pytest

from replyx.settings import Settings
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant, make_settings
from tests.net import eventually
from tests.raw_socket import PONG, TEXT, RawSocket
from ws_gateway.app import Gateway


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path / "var",
        REPLYX_MAX_SOCKETS_PER_IP="4",
        REPLYX_PING_INTERVAL="0.5",
        REPLYX_PING_TIMEOUT="0.5",
        REPLYX_SLOW_CLOSE_GRACE="2",
        REPLYX_FRAGMENT_TIMEOUT="1",
    )


# -- slots (item 2) ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=180)
async def test_failed_handshakes_give_their_slot_back_and_get_a_close_code(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway
) -> None:
    origin = tenant.domains[0]
    dialog_id, guest = await api.widget_dialog(tenant, origin=origin)
    site = quote(tenant.site_token)
    base = sockets.base
    spoiled = [
        f"/ws/site/dialogs/{dialog_id}?site_token=%ff{site}",
        f"/ws/site/dialogs/{dialog_id}?site_token={site}&since=%ff",
        f"/ws/dialogs/{dialog_id}?token=%ff{quote(tenant.token)}",
        f"/ws/widget/dialogs/{dialog_id}?assistant_id={tenant.assistant_id}&guest_token=%ff",
        f"/ws/widget/dialogs/{dialog_id}?assistant_id=%ff&guest_token={quote(guest)}",
        f"/ws/widget/dialogs/{dialog_id}?assistant_id={tenant.assistant_id}"
        f"&guest_token={quote(guest)}&parent_origin=%ff",
        "/ws/inbox?token=%ff",
    ]
    expected = dict.fromkeys(spoiled, 4400) | {
        # Every other refusal too (an admin socket refused before its user was known used
        # to keep its slot: its on_close failed).
        f"/ws/dialogs/{dialog_id}?token=not-a-jwt": 4001,
        f"/ws/dialogs/999999?token={quote(tenant.token)}": 4004,
        f"/ws/site/dialogs/{dialog_id}?site_token={site}&since=99999": 4400,
        f"/ws/widget/dialogs/{dialog_id}?guest_token={quote(guest)}&parent_origin=x": 4003,
        "/ws/inbox?token=not-a-jwt": 4001,
    }
    spoiled = list(expected)
    codes: dict[str, set[int | None]] = {path: set() for path in spoiled}

    async def attempt(path: str) -> None:
        raw = await RawSocket.connect(base + path, origin="https://elsewhere.example"
                                      if "parent_origin" in path else origin)
        try:
            codes[path].add(await raw.close_code(timeout=10))
        finally:
            raw.close()

    # 2000 of them, 4 at a time (the address's cap here is 4 sockets).
    for start in range(0, 2000, 4):
        await asyncio.gather(*(attempt(spoiled[(start + i) % len(spoiled)]) for i in range(4)))
    assert codes == {path: {code} for path, code in expected.items()}, codes
    await eventually(lambda: not gateway.sockets and not gateway.limiter.sockets_per_ip,
                     "every slot back")
    assert gateway.router.socket_count() == 0
    # The address is not locked out.
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    assert client.close_codes == []


# -- sockets that read nothing, messages that never finish (item 3) ---------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_socket_that_reads_nothing_is_closed_4008_whatever_pongs_it_sends(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway
) -> None:
    dialog_id = await api.site_dialog(tenant)
    polite = await sockets.open(sockets.site_url(tenant, dialog_id))
    stalled = await RawSocket.connect(sockets.site_url(tenant, dialog_id))
    await stalled.read_json("ready")
    # From here it reads nothing, but keeps sending unsolicited pongs (within its rate).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while len(gateway.router.sockets_of(dialog_id)) == 2 and loop.time() < deadline:
        await stalled.send(PONG, b"")
        await asyncio.sleep(0.2)
    assert len(gateway.router.sockets_of(dialog_id)) == 1, "the stalled socket is still there"
    assert await stalled.close_code(timeout=10) == 4008
    stalled.close()
    assert polite.close_codes == []


@pytest.mark.gen_test(timeout=60)
async def test_a_fragmented_message_that_never_finishes_is_closed_1008(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway
) -> None:
    dialog_id = await api.site_dialog(tenant)
    raw = await RawSocket.connect(sockets.site_url(tenant, dialog_id))
    await raw.read_json("ready")
    await raw.send(TEXT, b"[" + b"1," * 30000, fin=False)  # 60 KB, under the 64 KiB limit
    started = asyncio.get_running_loop().time()
    # It answers every ping meanwhile: only the unfinished message is held against it.
    assert await raw.close_code(timeout=15) == 1008
    assert asyncio.get_running_loop().time() - started < 5
    assert await raw.ended(timeout=10)
    raw.close()
    await eventually(lambda: not gateway.sockets, "the socket to go")
