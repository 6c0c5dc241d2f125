"""Hand-made NOTIFY payloads on ``replyx_events``: garbage is logged and dropped, forged events
never reach a socket, and real messages keep arriving, in order, exactly once.

Anyone with psql can ``NOTIFY replyx_events, '…'``; the gateway must treat the channel
as untrusted input.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from tornado.ioloop import IOLoop

from replyx.protocol import MAX_ID
from replyx.protocol import NOTIFY_CHANNEL as CHANNEL
from replyx_client import DialogClient
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from ws_gateway.app import Gateway
from ws_gateway.events import (
    KINDS,
    BadPayloadError,
    DialogEvent,
    PresenceEvent,
    TeamEvent,
    parse_event,
)

INSERT = "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'system', %s)"
NOTIFY = "SELECT pg_notify(%s, %s)"
CREATED = "2026-01-01T00:00:00.000000Z"


def message(dialog_id: Any, seq: Any, **extra: Any) -> str:
    value = {"type": "message", "dialog_id": dialog_id, "seq": seq, "id": 1,
             "sender": "operator", "text": "forged", "created_at": CREATED, **extra}
    return json.dumps(value)


def malformed(dialog_id: int) -> list[str]:
    """Payloads the parser must reject: each is logged once and dropped."""
    big = 2**63
    return [
        "", " ", "null", "[]", '"text"', "123", "{}", "{", "x" * 7000, "[" * 3000,
        '{"type":"message"}',
        '{"type":"delete","dialog_id":1}',
        '{"type":1,"dialog_id":1}',
        '{"type":[],"dialog_id":1}',                  # unhashable where a name belongs
        '{"type":{"message":1},"dialog_id":1}',
        json.dumps({"type": "typing", "dialog_id": dialog_id, "sender": ["visitor"]}),
        message(dialog_id, 2, sender={"visitor": 1}),
        json.dumps({"type": "typing", "dialog_id": dialog_id, "sender": "hacker"}),
        json.dumps({"type": "typing", "dialog_id": str(dialog_id), "sender": "visitor"}),
        json.dumps({"type": "typing", "dialog_id": dialog_id}),
        message(str(dialog_id), 1),                     # wrong types
        message(float(dialog_id), 1),
        message(True, 1),
        message(None, 1),
        message([dialog_id], 1),
        message(dialog_id, "2"),
        message(dialog_id, 2.0),
        message(dialog_id, 0),
        message(dialog_id, -1),
        message(dialog_id, 2, text=5),
        message(dialog_id, 2, sender="admin"),
        message(dialog_id, 2, created_at=None),
        message(dialog_id, 2, id="1"),
        message(big, 1),                                # huge numbers
        message(dialog_id, big),
        message(10**40, 1),
        message(-big, 1),
        '{"type":"message","dialog_id":1e400,"seq":1}',
        '{"type":"message","dialog_id":NaN,"seq":1}',
        json.dumps({"type": "message_ref", "dialog_id": dialog_id, "seq": 1}),
        json.dumps({"type": "message_ref", "dialog_id": dialog_id, "seq": big, "id": 1}),
    ]


async def deliver_one(sql: psycopg.Connection[Any], client: DialogClient, dialog_id: int,
                      text: str) -> None:
    sql.execute(INSERT, (dialog_id, text))
    seq = sql.execute("SELECT last_seq FROM dialogs WHERE id = %s", (dialog_id,)).fetchone()[0]
    await client.wait_for_seq(seq)


def stored(sql: psycopg.Connection[Any], dialog_id: int) -> list[tuple[int, int, str]]:
    rows = sql.execute("SELECT seq, id, text FROM messages WHERE dialog_id = %s ORDER BY seq",
                       (dialog_id,))
    return [tuple(row) for row in rows]


def received(client: DialogClient) -> list[tuple[int, int, str]]:
    return [(m["seq"], m["id"], m["text"]) for m in client.messages]


@pytest.mark.gen_test(timeout=60)
async def test_garbage_is_logged_and_dropped_while_delivery_goes_on(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway,
    sql: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    dialog_id = await api.site_dialog(tenant)
    site = await sockets.open(sockets.site_url(tenant, dialog_id))
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    await deliver_one(sql, site, dialog_id, "before")
    caplog.set_level(logging.INFO)

    garbage = malformed(dialog_id)
    sql.execute("NOTIFY replyx_events, 'x'")  # the contract's own example, as typed in psql
    for payload in garbage:
        sql.execute(NOTIFY, (CHANNEL, payload))
    await deliver_one(sql, site, dialog_id, "after")
    await admin.wait_for_seq(2)

    dropped = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("dropped malformed notification")]
    assert len(dropped) == len(garbage) + 1
    assert dropped[0] == "dropped malformed notification (not JSON): 'x'"
    assert max(len(line) for line in dropped) < 300  # a 7000-byte payload is not copied out
    assert gateway.stats.bad_notifications == len(garbage) + 1
    for client in (site, admin):
        assert received(client) == stored(sql, dialog_id)
        assert [f.data["type"] for f in client.frames] == [
            "ready", "presence", "message", "message"]
    assert gateway.health()["status"] == "ok"


@pytest.mark.gen_test(timeout=60)
async def test_well_formed_forgeries_never_reach_a_socket(
    api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway,
    sql: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture,
) -> None:
    dialog_id = await api.site_dialog(tenant)
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    for i in range(3):
        await deliver_one(sql, client, dialog_id, f"real {i}")
    caplog.set_level(logging.INFO)

    forgeries = [
        message(dialog_id, 2, text="rewritten history"),   # behind: a duplicate seq
        message(dialog_id, 9),                              # ahead: a gap nothing fills
        message(dialog_id, MAX_ID),
        # Ahead, with real seqs committed right behind it; past every seq this test commits
        # (up to 5), so a gap read that delivers those first never makes it exactly the
        # next one (that case is the known gap, xfailed below). It was 5: a flake.
        message(dialog_id, 7),
    ]
    for forged in forgeries:
        sql.execute(NOTIFY, (CHANNEL, forged))
    await deliver_one(sql, client, dialog_id, "real 3")
    sql.execute(NOTIFY, (CHANNEL, json.dumps(
        {"type": "message_ref", "dialog_id": dialog_id, "seq": 5, "id": 10**12})))
    # For a dialog nobody is connected to, a forgery is dropped like any unwatched event.
    sql.execute(NOTIFY, (CHANNEL, message(9_000_000_000, 1)))
    await deliver_one(sql, client, dialog_id, "real 4")

    assert received(client) == stored(sql, dialog_id)
    assert [m["text"] for m in client.messages] == [f"real {i}" for i in range(5)]
    assert client.duplicates == 0 and client.gaps == 0
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not in the database" in line for line in lines) == 3
    assert any(line.startswith(f"dropped message_ref dialog_id={dialog_id} seq=5")
               for line in lines)


@pytest.mark.xfail(strict=True, reason=(
    "known gap: a forged NOTIFY carrying exactly a live socket's next seq is indistinguishable"
    " from the trigger's without a database read per event on the live path; the real row"
    " with that seq is then skipped as a duplicate (README, Security)"))
@pytest.mark.gen_test(timeout=30)
async def test_a_forgery_with_exactly_the_next_seq_is_not_delivered(
    api: Api, sockets: Sockets, tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    dialog_id = await api.site_dialog(tenant)
    client = await sockets.open(sockets.site_url(tenant, dialog_id))
    await deliver_one(sql, client, dialog_id, "real 0")
    sql.execute(NOTIFY, (CHANNEL, message(dialog_id, 2)))
    await deliver_one(sql, client, dialog_id, "real 1")
    # Today: seq 2 is the forgery's "forged" text, and the real "real 1" was skipped.
    assert received(client) == stored(sql, dialog_id)


# -- properties ----------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(), st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=8)


def near_events(dialog_ids: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Payloads shaped like our events, with any field missing or of any JSON value."""
    fields = {
        "type": st.sampled_from(["message", "message_ref", "typing"]) | JSON_VALUES,
        "dialog_id": dialog_ids | JSON_VALUES,
        "seq": st.integers(min_value=-2, max_value=12) | JSON_VALUES,
        "id": st.integers(min_value=1, max_value=10**6) | JSON_VALUES,
        "sender": st.sampled_from(["visitor", "operator", "assistant", "system"]) | JSON_VALUES,
        "text": st.text(max_size=40) | JSON_VALUES,
        "created_at": st.just(CREATED) | JSON_VALUES,
    }
    return st.fixed_dictionaries({}, optional=fields).map(json.dumps)


def workspace_events() -> st.SearchStrategy[str]:
    """The workspace's events (read, dialog, team, presence), any field missing or of any value.

    Only for the parser: a well-formed one, sent for real, would close sockets or move presence.
    """
    count = st.integers(min_value=-1, max_value=12) | JSON_VALUES
    fields = {
        "dialog_id": st.integers(min_value=1, max_value=50) | JSON_VALUES,
        "assistant_id": st.integers(min_value=1, max_value=50) | JSON_VALUES,
        "user_id": st.integers(min_value=1, max_value=50) | JSON_VALUES,
        "seq": count, "version": count, "last_seq": count, "operator_read_seq": count,
        "visitor_read_seq": count, "unread": count, "activity": count,
        "side": st.sampled_from(["operator", "visitor"]) | JSON_VALUES,
        "last_message": st.none() | JSON_VALUES,
        "operators": st.just([[1, 2]]) | JSON_VALUES,
        "visitors": st.just([[1, True]]) | JSON_VALUES,
    }
    kinds = st.sampled_from(sorted(KINDS - {"message", "message_ref", "typing"}))
    return st.fixed_dictionaries({"type": kinds}, optional=fields).map(json.dumps)


def payloads(dialog_ids: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    postgres_text = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
    return st.one_of(
        near_events(dialog_ids),
        JSON_VALUES.map(json.dumps),
        st.text(alphabet=postgres_text, max_size=200),
    ).filter(lambda p: "\x00" not in p and len(p.encode()) < 7900)


@settings(max_examples=600, deadline=None)
@given(payloads(st.integers(min_value=1, max_value=50)) | workspace_events())
@example('{"type":[],"dialog_id":1}')  # once a TypeError that stopped all delivery
def test_the_parser_accepts_only_events_and_raises_only_bad_payload(payload: str) -> None:
    try:
        event = parse_event(payload)
    except BadPayloadError:
        return
    sent = json.loads(payload)
    assert event.kind in KINDS
    if isinstance(event, TeamEvent):
        assert 0 < event.assistant_id <= MAX_ID and 0 < event.user_id <= MAX_ID
        return
    if isinstance(event, PresenceEvent):
        assert 0 < event.version <= MAX_ID
        return
    assert 0 < event.dialog_id <= MAX_ID
    if isinstance(event, DialogEvent):
        assert 0 < event.assistant_id <= MAX_ID and min(event.version) >= 0
    elif event.kind == "typing":
        assert json.loads(event.payload) == {
            "type": "typing", "dialog_id": event.dialog_id, "sender": sent["sender"]}
    elif event.kind == "read":
        assert json.loads(event.payload) == {
            "type": "read", "dialog_id": event.dialog_id, "side": sent["side"],
            "seq": sent["seq"]}
    else:
        assert 0 < event.seq <= MAX_ID and 0 < event.message_id <= MAX_ID
    if event.kind == "message":
        assert event.payload == payload.encode()


def test_the_gateway_survives_any_payload_and_keeps_delivering(
    io_loop: IOLoop, api: Api, sockets: Sockets, tenant: Tenant, gateway: Gateway,
    sql: psycopg.Connection[Any],
) -> None:
    dialog_id = io_loop.run_sync(lambda: api.site_dialog(tenant))
    client = io_loop.run_sync(lambda: sockets.open(sockets.site_url(tenant, dialog_id)))
    ids = st.sampled_from([dialog_id, dialog_id + 1, 9_000_000_000])
    count = 0

    @settings(max_examples=120, deadline=None)
    @given(st.lists(payloads(ids), min_size=1, max_size=4))
    def notify_then_deliver(batch: list[str]) -> None:
        nonlocal count
        last = stored(sql, dialog_id)[-1][0] if count else 0
        for payload in batch:
            try:
                event = parse_event(payload)
            except BadPayloadError:
                continue
            # The one forgery the gateway cannot tell apart (see the xfail test above).
            assume(not (event.kind == "message" and event.dialog_id == dialog_id
                        and event.seq == last + 1))
        for payload in batch:
            sql.execute(NOTIFY, (CHANNEL, payload))
        count += 1
        io_loop.run_sync(lambda: deliver_one(sql, client, dialog_id, f"real {count}"),
                         timeout=30)

    notify_then_deliver()
    assert received(client) == stored(sql, dialog_id)
    assert client.duplicates == 0 and client.gaps == 0 and client.close_codes == []
    assert gateway.health()["status"] == "ok"
