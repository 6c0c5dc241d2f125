"""The inbox socket: each operator's dialogs across their assistants, live and exact.

Real gateway and backend (in-process) on real Postgres. After every scenario an
inbox's view must equal the database's state of every dialog it holds.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from replyx_client import DialogClient, DialogClosedError, InboxClient
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.test_asyncapi import Frames, document
from ws_gateway.app import Gateway

BIN = Path(sys.executable).parent


def inbox_url(sockets: Sockets, tenant: Tenant) -> str:
    return f"{sockets.base}/ws/inbox?token={quote(tenant.token)}"


async def open_inbox(sockets: Sockets, tenant: Tenant) -> InboxClient:
    client = InboxClient(inbox_url(sockets, tenant))
    sockets.clients.append(client)
    return await client.connect()  # type: ignore[return-value]


async def database_view(database_url: str, dialog_ids: list[int]) -> dict[int, tuple[int, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT id, last_seq, operator_read_seq, visitor_read_seq, unread FROM dialogs"
            " WHERE id = ANY(%s)", (dialog_ids,))
        return {int(r[0]): tuple(int(v) for v in r[1:]) for r in await cursor.fetchall()}


async def assert_inbox_matches_database(
    database_url: str, inbox: InboxClient, timeout: float = 15.0  # noqa: ASYNC109
) -> None:
    """Wait until the inbox's view equals the database's state of every dialog it holds."""
    async def same() -> bool:
        view = inbox.view()
        return bool(view) and view == await database_view(database_url, list(view))

    deadline = asyncio.get_running_loop().time() + timeout
    while not await same():
        if asyncio.get_running_loop().time() > deadline:
            view = inbox.view()
            known = await database_view(database_url, list(view))
            raise AssertionError(f"inbox {view} != database {known}")
        await asyncio.sleep(0.05)


def add_operator(database_url: str, tenant: Tenant, user_id: int, verb: str = "add") -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        [str(BIN / "replyx"), f"{verb}-operator", "--assistant-id", str(tenant.assistant_id),
         "--user-id", str(user_id)], env=env, capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.gen_test(timeout=60)
async def test_each_inbox_holds_exactly_its_assistants_dialogs_live(
    api: Api, sockets: Sockets, make_tenant: Any, database_url: str, sql: psycopg.Connection[Any]
) -> None:
    shop, other = make_tenant(), make_tenant()
    member = make_tenant()
    add_operator(database_url, shop, member.user_id)
    old = await api.site_dialog(shop)
    owner_inbox = await open_inbox(sockets, shop)
    member_inbox = await open_inbox(sockets, member)
    other_inbox = await open_inbox(sockets, other)
    assert set(owner_inbox.dialogs) == {old} and owner_inbox.total == 1
    # The member sees the shop's dialogs and their own assistant's (none yet).
    assert set(member_inbox.dialogs) == {old}
    assert other_inbox.dialogs == {} and other_inbox.total == 0

    # New dialogs from every kind of writer appear in every inbox of the shop's operators.
    widget_dialog, guest = await api.widget_dialog(shop)
    site_dialog = await api.site_dialog(shop)
    row = sql.execute("INSERT INTO dialogs (assistant_id, channel) VALUES (%s, 'site')"
                      " RETURNING id", (shop.assistant_id,)).fetchone()
    psql_dialog = int(row[0])
    mine = {old, widget_dialog, site_dialog, psql_dialog}
    for inbox in (owner_inbox, member_inbox):
        await inbox.wait_until(lambda i=inbox: set(i.dialogs) == mine, 10, "new dialogs")

    widget = await sockets.open(sockets.widget_url(shop, widget_dialog, guest),
                                origin=shop.domains[0])
    await api.post_widget(widget_dialog, guest, "hello")
    await api.post_widget(widget_dialog, guest, "anyone?")
    for inbox in (owner_inbox, member_inbox):
        await inbox.wait_until(
            lambda i=inbox: i.dialogs[widget_dialog]["unread"] == 2, 10, "unread")
        entry = inbox.dialogs[widget_dialog]
        assert entry["last_message"]["text"] == "anyone?" and entry["last_seq"] == 2
        await inbox.wait_until(
            lambda i=inbox: i.dialogs[widget_dialog]["visitor_online"] is True, 10, "online")
    # Reading clears unread for every operator and tells the widget.
    r = await api.request("POST", f"/api/dialogs/{widget_dialog}/read", {"seq": 2},
                          token=member.token)
    assert r.code == 200
    for inbox in (owner_inbox, member_inbox):
        await inbox.wait_until(lambda i=inbox: i.dialogs[widget_dialog]["unread"] == 0, 10, "read")
    read = await widget.wait_for_frame(lambda f: f.get("type") == "read")
    assert read == {"type": "read", "dialog_id": widget_dialog, "side": "operator", "seq": 2}
    for inbox in (owner_inbox, member_inbox):
        await assert_inbox_matches_database(database_url, inbox)

    # Every frame is one the protocol's document describes (docs/asyncapi.yaml).
    inbox_frames, widget_frames = Frames(document(), "inbox"), Frames(document(), "widgetDialog")
    for inbox in (owner_inbox, member_inbox, other_inbox):
        for frame in inbox.frames:
            inbox_frames.check(frame.data)
    for frame in widget.frames:
        widget_frames.check(frame.data)

    # The other tenant's operator learned nothing of any of it.
    await asyncio.sleep(0.3)
    assert other_inbox.dialogs == {} and other_inbox.updates == 0
    assert owner_inbox.stale == member_inbox.stale == 0
    assert not [f for f in other_inbox.frames if f.data.get("dialog_id") in mine]


@pytest.mark.gen_test(timeout=90)
async def test_snapshot_and_live_meet_without_gap_or_stale_entry(
    api: Api, sockets: Sockets, gateway: Gateway, tenant: Tenant, database_url: str
) -> None:
    """Writers commit while inboxes take their snapshots, slowed so commits land inside."""
    dialogs = [await api.site_dialog(tenant) for _ in range(6)]
    store = gateway.workspace.store
    real = store.inbox_snapshot

    async def slow_snapshot(user_id: int, limit: int) -> Any:
        await asyncio.sleep(random.uniform(0, 0.05))
        result = await real(user_id, limit)
        await asyncio.sleep(random.uniform(0, 0.1))  # commits land after the query's snapshot
        return result

    store.inbox_snapshot = slow_snapshot  # type: ignore[method-assign]
    stop = False

    async def writer(n: int) -> None:
        i = 0
        while not stop:
            dialog_id = random.choice(dialogs)
            if i % 3 == 2:
                last = (await database_view(database_url, [dialog_id]))[dialog_id][0]
                await api.request("POST", f"/api/dialogs/{dialog_id}/read", {"seq": last},
                                  token=tenant.token)
            else:
                await api.post_site(tenant, dialog_id, f"w{n} {i}")
            i += 1

    writers = [asyncio.ensure_future(writer(n)) for n in range(4)]
    inboxes = []
    for _ in range(8):
        inboxes.append(await open_inbox(sockets, tenant))
        await asyncio.sleep(0.05)
    stop = True
    await asyncio.gather(*writers)
    for inbox in inboxes:
        await assert_inbox_matches_database(database_url, inbox)
        assert set(inbox.dialogs) == set(dialogs)
        assert inbox.stale == 0, "an entry the snapshot already showed was sent again"


@pytest.mark.gen_test(timeout=60)
async def test_inbox_survives_a_killed_listener(
    api: Api, sockets: Sockets, tenant: Tenant, database_url: str, sql: psycopg.Connection[Any]
) -> None:
    dialogs = [await api.site_dialog(tenant) for _ in range(3)]
    inbox = await open_inbox(sockets, tenant)
    for i in range(20):
        if i == 5:
            sql.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'replyx-gateway-listener'"
                        " AND datname = current_database()")
        await api.post_site(tenant, dialogs[i % 3], f"m{i}")
    await assert_inbox_matches_database(database_url, inbox)
    assert inbox.snapshots >= 2  # the resync after the listener came back


@pytest.mark.gen_test(timeout=60)
async def test_removed_operator_loses_sockets_and_the_assistant(
    api: Api, sockets: Sockets, make_tenant: Any, database_url: str
) -> None:
    shop, member = make_tenant(), make_tenant()
    add_operator(database_url, shop, member.user_id)
    dialog_id = await api.site_dialog(shop)
    admin = await sockets.open(sockets.admin_url(member, dialog_id))
    inbox = await open_inbox(sockets, member)
    assert set(inbox.dialogs) == {dialog_id}
    add_operator(database_url, shop, member.user_id, "remove")
    with pytest.raises(DialogClosedError) as closed:
        await admin.wait_until(lambda: False, 10, "the close")
    assert closed.value.code == 4001
    await inbox.wait_until(lambda: inbox.dialogs == {}, 10, "an empty snapshot")
    code = await sockets.refused(sockets.admin_url(member, dialog_id))
    assert code == 4004


@pytest.mark.gen_test(timeout=30)
async def test_inbox_refuses_bad_tokens(sockets: Sockets, tenant: Tenant) -> None:
    for token in ("", "garbage", tenant.site_token):
        client = DialogClient(f"{sockets.base}/ws/inbox?token={quote(token)}", resume=False)
        sockets.clients.append(client)
        with pytest.raises(DialogClosedError) as refused:
            await client.connect()
        assert refused.value.code == 4001
        assert client.frames == []


@pytest.mark.gen_test(timeout=30)
async def test_a_socket_opened_after_a_read_learns_the_read_state_after_ready(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    for i in range(3):
        await api.post_widget(dialog_id, guest, f"v{i}")
    r = await api.request("POST", f"/api/dialogs/{dialog_id}/read", {"seq": 2}, token=tenant.token)
    assert r.code == 200
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    await widget.wait_for_frame(lambda f: f.get("type") == "presence")
    assert [f.data for f in widget.frames][:3] == [
        {"type": "ready", "dialog_id": dialog_id, "last_seq": 3},
        {"type": "read", "dialog_id": dialog_id, "side": "operator", "seq": 2},
        {"type": "presence", "operators_online": 0},
    ]
