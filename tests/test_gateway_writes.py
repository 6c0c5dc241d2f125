"""The gateway's write path and handshake edges, against real sockets and Postgres."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tornado.ioloop import IOLoop

from tests.fix_apps import Api, Sockets, start_gateway
from tests.fix_db import Tenant, make_settings
from tests.net import eventually
from ws_gateway.app import Gateway

INSERT = "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, %s, %s)"


@pytest.fixture
def small_buffer_gateway(
    io_loop: IOLoop, tmp_path: Path, database_url: str
) -> Iterator[Gateway]:
    """A gateway whose per-socket write buffer is 16 KiB (the default is 1 MiB)."""
    gateway = start_gateway(
        io_loop, make_settings(tmp_path / "var", REPLYX_SOCKET_BUFFER="16384"), database_url
    )
    yield gateway
    io_loop.run_sync(gateway.stop, timeout=30)


@pytest.mark.gen_test(timeout=30)
async def test_a_frame_larger_than_the_buffer_limit_reaches_a_reading_client(
    api: Api, small_buffer_gateway: Gateway, tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    """The limit bounds what waits behind other frames. A reader must never get 4008 for
    one big message, and a frame is never cut in two (a cut frame corrupts the stream)."""
    sockets = Sockets(f"ws://127.0.0.1:{small_buffer_gateway.port}")
    dialog_id = await api.site_dialog(tenant)
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    # A small kernel send buffer, as over a real network: the big frame's first send()
    # takes only part of it, and the rest must be queued whole.
    (server_side,) = small_buffer_gateway.router.sockets_of(dialog_id)
    server_side.ws_connection.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = "Ж" * 150_000  # 300 kB of UTF-8: a message_ref, then one 300 kB frame
    sql.execute(INSERT, (dialog_id, "system", big))
    await client.wait_for_seq(1, timeout=20)
    # (Posted once the big frame is out: anything queued behind a frame still draining
    # counts against the limit, which is how a client that stopped reading is found.)
    after = await api.post_site(tenant, dialog_id, "after the big one")
    await client.wait_for_seq(2, timeout=20)
    assert client.messages[0]["text"] == big
    assert client.messages[1] == after
    assert client.close_codes == []
    await sockets.close_all()


@pytest.mark.gen_test(timeout=30)
async def test_a_replay_is_not_held_while_a_message_ref_is_read(
    api: Api, sockets: Sockets, gateway: Gateway, make_tenant: Any,
    sql: psycopg.Connection[Any],
) -> None:
    """While the consumer waits for a big message's row, a joining socket's replay and its
    ready frame go out at once, not when that read ends."""
    alice, bob = make_tenant(), make_tenant()
    busy = await api.site_dialog(alice)
    await sockets.open(sockets.site_url(alice, busy))
    quiet = await api.site_dialog(bob)
    for i in range(5):
        await api.post_site(bob, quiet, f"history {i}")

    gate = asyncio.Event()
    read_started = asyncio.Event()
    real_read = gateway.store.message_by_ref

    async def slow_read(*args: Any) -> Any:
        # The real query, only later: as if the database took its time.
        read_started.set()
        await gate.wait()
        return await real_read(*args)

    gateway.store.message_by_ref = slow_read  # type: ignore[method-assign]
    try:
        sql.execute(INSERT, (busy, "system", "x" * 9000))  # over 8000 bytes: a message_ref
        await asyncio.wait_for(read_started.wait(), 10)
        joiner = await sockets.open(sockets.site_url(bob, quiet), since=0)
        assert joiner.seqs == [1, 2, 3, 4, 5]
        assert not gate.is_set()
    finally:
        gate.set()


@pytest.mark.gen_test(timeout=60)
async def test_a_burst_over_many_dialogs_arrives_whole_and_in_order_beside_a_join(
    api: Api, sockets: Sockets, tenant: Tenant, sql: psycopg.Connection[Any],
) -> None:
    """One transaction of 10 messages on each of 40 dialogs: 400 notifications, so the consumer
    holds its batch across the LISTEN connection's reads. Every socket gets 1..10 once each, in
    order, and a socket joining another dialog meanwhile gets its replay and ready."""
    dialogs = [row[0] for row in sql.execute(
        "INSERT INTO dialogs (assistant_id, channel)"
        " SELECT %s, 'site' FROM generate_series(1, 40) RETURNING id", (tenant.assistant_id,),
    ).fetchall()]
    clients = [await sockets.open(sockets.site_url(tenant, d)) for d in dialogs]
    quiet = await api.site_dialog(tenant)
    for i in range(3):
        await api.post_site(tenant, quiet, f"history {i}")
    sql.execute(
        "INSERT INTO messages (dialog_id, sender, text)"
        " SELECT d, 'system', 'burst ' || i FROM generate_series(1, 10) i, unnest(%s::bigint[]) d",
        (dialogs,),
    )
    joiner = await sockets.open(sockets.site_url(tenant, quiet), since=0)
    assert joiner.seqs == [1, 2, 3]
    for client in clients:
        await client.wait_for_seq(10, timeout=20)
    for client in clients:
        assert client.seqs == list(range(1, 11))
        assert [m["text"] for m in client.messages] == [f"burst {i}" for i in range(1, 11)]
        assert client.duplicates == 0 and client.gaps == 0
        assert client.close_codes == []
    await sockets.close_all()


@pytest.mark.gen_test(timeout=30)
async def test_since_ahead_of_the_dialog_is_refused(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    """Seqs only grow: a `since` past the dialog's last seq is state from another database."""
    dialog_id = await api.site_dialog(tenant)
    await api.post_site(tenant, dialog_id, "one")
    assert await sockets.refused(sockets.site_url(tenant, dialog_id) + "&since=2") == 4400
    client = await sockets.open(sockets.site_url(tenant, dialog_id), since=1)
    assert next(f.data for f in client.frames if f.data["type"] == "ready")["last_seq"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_join_that_outlasts_its_deadline_gets_1013_and_is_counted(
    io_loop: IOLoop, api: Api, tmp_path: Path, database_url: str, tenant: Tenant
) -> None:
    """Authorisation and replay are bounded: past REPLYX_JOIN_TIMEOUT the client is told to
    try again (1013) instead of hanging until Tornado's ping timeout closes it with 1000."""
    settings = make_settings(tmp_path / "var", REPLYX_JOIN_TIMEOUT="0.000001")
    gateway = Gateway(settings, database_url)
    await gateway.start(port=0, host="127.0.0.1")
    try:
        sockets = Sockets(f"ws://127.0.0.1:{gateway.port}")
        dialog_id = await api.site_dialog(tenant)
        assert await sockets.refused(sockets.site_url(tenant, dialog_id)) == 1013
        assert gateway.stats.refused["1013"] == 1
        assert not gateway.sockets
    finally:
        await gateway.stop()


class CountingPool:
    """The gateway's pool, counting the queries (round trips) made through it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.queries: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.pool, name)
        if name not in ("fetch", "fetchrow", "fetchval", "execute"):
            return attr

        def counted(query: str, *args: Any, **kwargs: Any) -> Any:
            self.queries.append(" ".join(query.split())[:60])
            return attr(query, *args, **kwargs)

        return counted


@pytest.mark.gen_test(timeout=30)
async def test_a_handshake_is_one_database_round_trip(
    api: Api, sockets: Sockets, gateway: Gateway, tenant: Tenant
) -> None:
    """Authorisation, the dialog's last seq and the first replay page come in one query,
    for each kind of socket, with and without since, accepted or refused."""
    dialog_id, guest = await api.widget_dialog(tenant)
    for i in range(3):
        await api.post_widget(dialog_id, guest, f"history {i}")
    store = gateway.store
    counting = CountingPool(store.pool)
    store.pool = counting  # type: ignore[assignment]
    try:
        handshakes: list[tuple[str, Any]] = [
            ("admin", lambda: sockets.open(sockets.admin_url(tenant, dialog_id))),
            ("admin since=0", lambda: sockets.open(sockets.admin_url(tenant, dialog_id), since=0)),
            ("site since=1", lambda: sockets.open(sockets.site_url(tenant, dialog_id), since=1)),
            ("widget since=2", lambda: sockets.open(
                sockets.widget_url(tenant, dialog_id, guest), origin=tenant.domains[0], since=2)),
            ("since ahead", lambda: sockets.refused(
                sockets.site_url(tenant, dialog_id) + "&since=9")),
            ("not yours", lambda: sockets.refused(sockets.site_url(tenant, dialog_id + 10**6))),
        ]
        for name, handshake in handshakes:
            counting.queries.clear()
            await handshake()
            assert len(counting.queries) == 1, (name, counting.queries)
    finally:
        store.pool = counting.pool
    clients = [c for c in sockets.clients if c.frames]
    assert [c.seqs for c in clients[:4]] == [[], [1, 2, 3], [2, 3], [3]]


@pytest.mark.gen_test(timeout=30)
async def test_a_closed_sockets_session_is_freed_without_a_garbage_collection(
    api: Api, sockets: Sockets, gateway: Gateway, tenant: Tenant
) -> None:
    """A session and its write path point at each other; the end of the connection must
    undo that, or every closed socket's objects wait for a collection of the generation
    they reached (one full collection of thousands of sockets stops the loop for 250+ ms,
    see ws_gateway/gctune.py)."""
    dialog_id, guest = await api.widget_dialog(tenant)
    await sockets.open(sockets.admin_url(tenant, dialog_id))
    await sockets.open(sockets.site_url(tenant, dialog_id))
    await sockets.open(sockets.widget_url(tenant, dialog_id, guest), origin=tenant.domains[0])
    sessions = [weakref.ref(session) for session in gateway.router.sockets_of(dialog_id)]
    assert len(sessions) == 3
    gc.disable()  # only reference counting frees anything from here on
    try:
        await sockets.close_all()
        await eventually(lambda: all(ref() is None for ref in sessions),
                         "every session freed by reference counting", timeout=10)
    finally:
        gc.enable()
