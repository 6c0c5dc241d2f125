"""The seed's scenarios against the real gateway and backend apps (in-process, real Postgres)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from ws_gateway.app import Gateway

INSERT = "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, %s, %s)"


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages]


@pytest.mark.gen_test(timeout=30)
async def test_admin_and_widget_both_receive_visitor_and_operator(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])

    visitor = await api.post_widget(dialog_id, guest, "Hello, is anyone there?")
    operator = await api.post_operator(tenant, dialog_id, "Hi! How can I help?")

    for client in (admin, widget):
        await client.wait_for_seq(2)
        assert client.messages == [visitor, operator]
        assert [m["sender"] for m in client.messages] == ["visitor", "operator"]
        assert client.duplicates == 0 and client.gaps == 0


@pytest.mark.gen_test(timeout=30)
async def test_three_sites_in_parallel_get_only_their_own(
    api: Api, sockets: Sockets, make_tenant: Any
) -> None:
    tenants = [make_tenant() for _ in range(3)]
    dialogs = [await api.site_dialog(t) for t in tenants]
    pairs = list(zip(tenants, dialogs, strict=True))
    clients = [await sockets.open(sockets.site_url(t, d)) for t, d in pairs]

    async def talk(tenant: Tenant, dialog_id: int) -> None:
        for i in range(10):
            await api.post_site(tenant, dialog_id, f"site {dialog_id} message {i}")

    await asyncio.gather(*(talk(t, d) for t, d in pairs))
    for client in clients:
        await client.wait_for_seq(10)
    await asyncio.sleep(0.2)  # room for a stray frame to arrive
    for client, dialog_id in zip(clients, dialogs, strict=True):
        assert client.seqs == list(range(1, 11))
        assert texts(client.messages) == [f"site {dialog_id} message {i}" for i in range(10)]
        # Every frame, not only the kept messages: DialogClient silently drops a message
        # whose seq it has passed as a duplicate, and another dialog's seq 3 looks exactly
        # like a duplicate of this one's. (Checked: a router that also wrote each message to
        # the other dialogs' sockets already past its seq passed the old assertions, 17
        # foreign frames per client; it fails these.)
        # (Presence frames for a site socket name no dialog: they are about its assistant.)
        foreign = [f.data for f in client.frames
                   if f.data.get("dialog_id") != dialog_id and f.data["type"] != "presence"]
        assert foreign == [], f"{len(foreign)} frames of other dialogs reached {dialog_id}"
        assert client.duplicates == 0 and client.gaps == 0
        assert [f.data["type"] for f in client.frames] == ["ready", "presence"] + ["message"] * 10
        assert [f.data for f in client.frames][1] == {"type": "presence", "operators_online": 0}


@pytest.mark.gen_test(timeout=30)
async def test_psql_insert_is_delivered(
    api: Api, sockets: Sockets, tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    dialog_id = await api.site_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    sql.execute(INSERT, (dialog_id, "system", "typed by hand in psql"))
    await admin.wait_for_seq(1)
    assert admin.messages[0]["text"] == "typed by hand in psql"
    assert admin.messages[0]["sender"] == "system"


@pytest.mark.gen_test(timeout=30)
async def test_rolled_back_insert_is_never_delivered_and_leaves_no_hole(
    api: Api, sockets: Sockets, tenant: Tenant, database_url: str, sql: psycopg.Connection[Any]
) -> None:
    dialog_id = await api.site_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    with psycopg.connect(database_url) as conn:
        conn.execute(INSERT, (dialog_id, "visitor", "rolled back"))
        conn.rollback()
    after = await api.post_site(tenant, dialog_id, "committed")
    await admin.wait_for_seq(1)
    await asyncio.sleep(0.3)
    assert admin.messages == [after]
    assert after["seq"] == 1
    assert "rolled back" not in texts(admin.messages)


# The handshake reads last_seq and the first replay page in one query (site_opening).
@pytest.mark.parametrize(("since", "snapshot"), [(None, "site_opening"), (0, "site_opening")])
@pytest.mark.gen_test(timeout=30)
async def test_a_message_committed_while_the_socket_joins_is_not_missed(
    api: Api, sockets: Sockets, gateway: Gateway, tenant: Tenant, sql: psycopg.Connection[Any],
    since: int | None, snapshot: str,
) -> None:
    """The join's own database read is slowed, and a row committed inside it, after its
    snapshot, and routed before the read returns: the socket must still get that row.

    Without ``since`` the socket starts from the dialog's last seq; with it, from the replay;
    both come from the handshake's one query. Checked by breaking ws_gateway/router.py locally:
    registering the socket after the replay fails the ``since=0`` case; going live on
    ``last_seq`` without a catch-up fails the ``since=None`` case (both reverted).
    """
    dialog_id = await api.site_dialog(tenant)
    for i in range(3):
        await api.post_site(tenant, dialog_id, f"history {i}")
    real_read = getattr(gateway.store, snapshot)
    committed: list[int] = []

    async def read_then_commit(*args: Any) -> Any:
        result = await real_read(*args)  # the snapshot this socket starts from
        if not committed:
            routed = gateway.stats.messages_routed
            row = sql.execute(INSERT + " RETURNING seq",
                              (dialog_id, "visitor", "inside the join")).fetchone()
            committed.append(row[0])
            deadline = time.monotonic() + 5
            while gateway.stats.messages_routed == routed:  # its NOTIFY went through the router
                assert time.monotonic() < deadline, "the NOTIFY was not routed"
                await asyncio.sleep(0.01)
        return result

    setattr(gateway.store, snapshot, read_then_commit)
    try:
        client = await sockets.open(sockets.site_url(tenant, dialog_id), since=since)
    finally:
        setattr(gateway.store, snapshot, real_read)
    assert committed == [4], "the join no longer reads through store." + snapshot
    await client.wait_for_seq(4, timeout=5)
    assert client.seqs == ([1, 2, 3, 4] if since == 0 else [4])
    assert client.messages[-1]["text"] == "inside the join"
    assert client.duplicates == 0 and client.gaps == 0
    await api.post_site(tenant, dialog_id, "after")
    await client.wait_for_seq(5)


@pytest.mark.gen_test(timeout=30)
async def test_since_replays_then_goes_live_without_duplicates(
    api: Api, sockets: Sockets, tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    dialog_id = await api.site_dialog(tenant)
    for i in range(5):
        await api.post_site(tenant, dialog_id, f"old {i}")
    client = await sockets.open(sockets.admin_url(tenant, dialog_id), since=2)
    assert client.seqs == [3, 4, 5]
    ready = next(f.data for f in client.frames if f.data["type"] == "ready")
    assert ready == {"type": "ready", "dialog_id": dialog_id, "last_seq": 5}
    # ready comes after the replay, and only once
    kinds = [f.data["type"] for f in client.frames]
    assert kinds == ["message", "message", "message", "ready", "presence"]
    await api.post_site(tenant, dialog_id, "new")
    await client.wait_for_seq(6)
    assert client.seqs == [3, 4, 5, 6]
    assert client.duplicates == 0


@pytest.mark.gen_test(timeout=30)
async def test_without_since_the_socket_starts_at_the_current_seq(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id = await api.site_dialog(tenant)
    await api.post_site(tenant, dialog_id, "before")
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    assert client.messages == []
    assert client.frames[0].data["last_seq"] == 1
    await api.post_site(tenant, dialog_id, "after")
    await client.wait_for_seq(2)
    assert texts(client.messages) == ["after"]


@pytest.mark.gen_test(timeout=30)
async def test_typing_is_ephemeral(api: Api, sockets: Sockets, tenant: Tenant) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    r = await api.request("POST", f"/api/widget/dialogs/{dialog_id}/typing", token=guest)
    assert r.code == 204
    frame = await admin.wait_for_frame(lambda f: f["type"] == "typing")
    assert frame == {"type": "typing", "dialog_id": dialog_id, "sender": "visitor"}
    history = await api.request("GET", f"/api/dialogs/{dialog_id}/messages", token=tenant.token)
    assert history.body["messages"] == []
    # A typing event carries no seq and does not move the dialog's sequence.
    message = await api.post_widget(dialog_id, guest, "first real message")
    assert message["seq"] == 1


def utf8_text(size: int) -> str:
    """Cyrillic, CJK and emoji (2, 3 and 4 bytes a character), exactly ``size`` bytes."""
    unit = "Привет, 世界! 🌍 "
    text = unit * (size // len(unit.encode()))
    return text + "x" * (size - len(text.encode()))


@pytest.mark.gen_test(timeout=30)
async def test_large_message_is_delivered_whole(
    api: Api, sockets: Sockets, tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    """Over NOTIFY's 8000-byte limit: the notification carries a reference, the gateway
    reads the row. Live sockets of every kind and a replay get the same bytes."""
    dialog_id, guest = await api.widget_dialog(tenant)
    live = [
        await sockets.open(sockets.admin_url(tenant, dialog_id)),
        await sockets.open(sockets.widget_url(tenant, dialog_id, guest), origin=tenant.domains[0]),
        await sockets.open(sockets.site_url(tenant, dialog_id)),
    ]
    text = utf8_text(60_000)
    assert len(text.encode()) == 60_000 and len(text) < 32_000
    posted = await api.post_site(tenant, dialog_id, text)  # through the backend
    by_hand = text * 2  # 120,000 bytes, typed in psql
    sql.execute(INSERT, (dialog_id, "system", by_hand))
    small = await api.post_site(tenant, dialog_id, "small after big")
    for client in live:
        await client.wait_for_seq(3)
        assert client.messages[0] == posted
        assert client.messages[0]["text"] == text
        assert client.messages[1]["text"] == by_hand
        assert client.messages[2] == small
        assert client.duplicates == 0 and client.gaps == 0
    replayed = await sockets.open(sockets.admin_url(tenant, dialog_id), since=0)
    assert replayed.messages == live[0].messages
