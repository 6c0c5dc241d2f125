"""Replays are bounded in bytes (issue 16, items 1 and 7): a page holds at most
REPLYX_REPLAY_PAGE_BYTES of frames (a row at least), all pages together at most
REPLYX_REPLAY_MEMORY, the memory comes back when the sockets go, and a replay the client
does not read ends 4008 (slow client), never a fake ``1013 database unavailable``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from replyx.settings import Settings
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant, make_settings
from tests.net import eventually
from tests.raw_socket import RawSocket
from ws_gateway.app import Gateway

MiB = 1 << 20
#: What 500 messages of 32,768 control characters and 4 stalled since=0 readers may add to
#: the (in-process) gateway's RSS, at REPLYX_REPLAY_MEMORY=8 MiB and 1 MiB pages. Before:
#: +206 MiB for one reader, +562 MiB for four, 468 MiB of it kept after they closed.
RSS_BOUND = 96 * MiB


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path / "var",
        # Pings far apart: the replay's own slow-client policy closes these, not the keepalive.
        REPLYX_PING_INTERVAL="30",
        REPLYX_PING_TIMEOUT="30",
        REPLYX_SLOW_CLOSE_GRACE="2",
        REPLYX_REPLAY_MEMORY=str(8 * MiB),
        REPLYX_REPLAY_PAGE_BYTES=str(MiB),
    )


@pytest.mark.gen_test(timeout=180)
async def test_stalled_replays_of_huge_rows_stay_within_a_byte_bound_and_end_4008(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway,
    sql: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    origin = tenant.domains[0]
    dialog_id, guest = await api.widget_dialog(tenant, origin=origin)
    # 500 messages of 32,768 control characters: ~196 KB each as a JSON frame (~98 MB).
    sql.execute("INSERT INTO messages (dialog_id, sender, text)"
                " SELECT %s, 'visitor', repeat(chr(1), 32768) FROM generate_series(1, 500)",
                (dialog_id,))
    url = sockets.widget_url(tenant, dialog_id, guest, since="0")
    gc.collect()
    process = psutil.Process()
    before = peak = process.memory_info().rss
    caplog.set_level(logging.INFO)

    readers = [await RawSocket.connect(url, origin=origin) for _ in range(4)]
    for raw in readers:
        raw.answer_pings = False  # they read nothing at all
    # Until the gateway gives up on them; then they read it all, down to the close frame.
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 60  # the old code held on (and ended 1013): watch it a while
    while gateway.stats.slow_consumers_dropped < len(readers) and loop.time() < give_up:
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.02)
    codes = await asyncio.gather(*(raw.close_code(timeout=30) for raw in readers))
    for raw in readers:
        raw.close()
    await eventually(lambda: not gateway.sockets, "the sockets to go")
    gc.collect()
    await asyncio.sleep(0.5)
    after = process.memory_info().rss
    print(f"RSS before {before / MiB:.0f} MiB, peak +{(peak - before) / MiB:.0f} MiB,"
          f" after +{(after - before) / MiB:.0f} MiB; closes {codes}")

    assert peak - before < RSS_BOUND, f"peak +{(peak - before) / MiB:.0f} MiB"
    assert after - before < RSS_BOUND, f"kept +{(after - before) / MiB:.0f} MiB"
    budget = gateway.router.budget
    assert budget.free == budget.capacity  # every page gave its room back
    # A slow replay is a slow client (4008), not a database outage (1013), and no traceback.
    assert codes == [4008] * 4, codes
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "1013" in r.getMessage()]
    assert gateway.stats.slow_consumers_dropped >= 4


@pytest.mark.gen_test(timeout=120)
async def test_a_reader_of_a_huge_history_gets_all_of_it_in_byte_bounded_pages(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway,
    sql: psycopg.Connection[Any],
) -> None:
    dialog_id = await api.site_dialog(tenant)
    sql.execute("INSERT INTO messages (dialog_id, sender, text)"
                " SELECT %s, 'visitor', repeat(chr(1), 32768) || g FROM generate_series(1, 60) g",
                (dialog_id,))
    pages: list[int] = []
    store = gateway.store
    original = store.messages_after

    async def counted(dialog: int, since: int, limit: int, max_bytes: int) -> Any:
        rows = await original(dialog, since, limit, max_bytes)
        pages.append(sum(len(p) for _, p in rows))
        return rows

    store.messages_after = counted  # type: ignore[method-assign, assignment]
    client = await sockets.open(sockets.site_url(tenant, dialog_id) + "&since=0")
    await client.wait_for_seq(60, timeout=60)
    assert client.seqs[:60] == list(range(1, 61)) and client.gaps == 0
    # The handshake's page and each catch-up page: about 1 MiB, one row past it at most.
    assert pages and max(pages) < MiB + 200_000, pages
    assert gateway.router.budget.free == gateway.router.budget.capacity
