"""The workspace in the database: teams, read state, unread counts and dialog events.

What any SQL writer (the backend, a batch job, psql) gets from the triggers of
migration 0005, checked with plain SQL on a real Postgres.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from replyx.protocol import NOTIFY_CHANNEL
from tests.fix_db import Tenant


def notifications(listener: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [json.loads(n.payload) for n in listener.notifies(timeout=0.5, stop_after=50)]


@pytest.fixture
def listener(database_url: str) -> Any:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield conn


def new_dialog(sql: psycopg.Connection[Any], tenant: Tenant, channel: str = "site") -> int:
    row = sql.execute(
        "INSERT INTO dialogs (assistant_id, channel) VALUES (%s, %s) RETURNING id",
        (tenant.assistant_id, channel),
    ).fetchone()
    assert row is not None
    return int(row[0])


def post(sql: psycopg.Connection[Any], dialog_id: int, sender: str, text: str = "hi") -> None:
    sql.execute("INSERT INTO messages (dialog_id, sender, text) VALUES (%s, %s, %s)",
                (dialog_id, sender, text))


def state(sql: psycopg.Connection[Any], dialog_id: int) -> tuple[int, int, int, int]:
    row = sql.execute(
        "SELECT last_seq, operator_read_seq, visitor_read_seq, unread FROM dialogs WHERE id = %s",
        (dialog_id,),
    ).fetchone()
    assert row is not None
    return tuple(int(v) for v in row)  # type: ignore[return-value]


def test_the_owner_is_an_operator_and_members_come_and_go_with_events(
    sql: psycopg.Connection[Any], listener: psycopg.Connection[Any], tenant: Tenant,
    make_tenant: Any,
) -> None:
    other = make_tenant()
    team = sql.execute("SELECT user_id FROM assistant_operators WHERE assistant_id = %s",
                       (tenant.assistant_id,)).fetchall()
    assert team == [(tenant.user_id,)]
    notifications(listener)
    sql.execute("INSERT INTO assistant_operators (assistant_id, user_id) VALUES (%s, %s)",
                (tenant.assistant_id, other.user_id))
    sql.execute("DELETE FROM assistant_operators WHERE assistant_id = %s AND user_id = %s",
                (tenant.assistant_id, other.user_id))
    events = [e for e in notifications(listener) if e["type"].startswith("operator_")]
    assert events == [
        {"type": "operator_added", "assistant_id": tenant.assistant_id, "user_id": other.user_id},
        {"type": "operator_removed", "assistant_id": tenant.assistant_id,
         "user_id": other.user_id},
    ]


def test_unread_counts_visitor_messages_and_read_state_only_moves_forward(
    sql: psycopg.Connection[Any], tenant: Tenant
) -> None:
    dialog_id = new_dialog(sql, tenant)
    for sender in ("visitor", "visitor", "operator", "assistant", "visitor"):
        post(sql, dialog_id, sender)
    assert state(sql, dialog_id) == (5, 0, 0, 4)
    sql.execute("UPDATE dialogs SET operator_read_seq = 3 WHERE id = %s", (dialog_id,))
    assert state(sql, dialog_id) == (5, 3, 0, 2)
    # A lower seq is a no-op, for either side.
    sql.execute("UPDATE dialogs SET operator_read_seq = 1, visitor_read_seq = 4 WHERE id = %s",
                (dialog_id,))
    sql.execute("UPDATE dialogs SET visitor_read_seq = 2 WHERE id = %s", (dialog_id,))
    assert state(sql, dialog_id) == (5, 3, 4, 2)
    with pytest.raises(psycopg.errors.CheckViolation, match="cannot pass last_seq"):
        sql.execute("UPDATE dialogs SET operator_read_seq = 6 WHERE id = %s", (dialog_id,))
    sql.execute("UPDATE dialogs SET operator_read_seq = 5 WHERE id = %s", (dialog_id,))
    assert state(sql, dialog_id) == (5, 5, 4, 0)
    post(sql, dialog_id, "visitor")
    assert state(sql, dialog_id) == (6, 5, 4, 1)


def test_dialogs_messages_and_reads_are_events_in_commit_order(
    sql: psycopg.Connection[Any], listener: psycopg.Connection[Any], tenant: Tenant
) -> None:
    dialog_id = new_dialog(sql, tenant, "widget")
    post(sql, dialog_id, "visitor", "x" * 300)
    sql.execute("UPDATE dialogs SET operator_read_seq = 1 WHERE id = %s", (dialog_id,))
    sql.execute("UPDATE dialogs SET operator_read_seq = 1 WHERE id = %s", (dialog_id,))  # no-op
    events = [e for e in notifications(listener) if e.get("dialog_id") == dialog_id]
    assert [e["type"] for e in events] == ["dialog", "message", "dialog", "read", "dialog"]
    created, _, after_message, read, after_read = events
    assert created["last_seq"] == 0 and created["last_message"] is None
    assert created["assistant_id"] == tenant.assistant_id and created["channel"] == "widget"
    assert after_message["last_seq"] == 1 and after_message["unread"] == 1
    assert after_message["last_message"]["text"] == "x" * 200
    assert after_message["last_message"]["sender"] == "visitor"
    assert after_message["activity"] > created["activity"]
    assert read == {"type": "read", "dialog_id": dialog_id, "side": "operator", "seq": 1}
    assert after_read["unread"] == 0 and after_read["operator_read_seq"] == 1
    assert after_read["activity"] == after_message["activity"]  # reading is not activity


def test_a_rolled_back_message_changes_no_count_and_sends_nothing(
    sql: psycopg.Connection[Any], listener: psycopg.Connection[Any], database_url: str,
    tenant: Tenant,
) -> None:
    dialog_id = new_dialog(sql, tenant)
    notifications(listener)
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', 'x')",
                     (dialog_id,))
        conn.rollback()
    assert state(sql, dialog_id) == (0, 0, 0, 0)
    assert [e for e in notifications(listener) if e.get("dialog_id") == dialog_id] == []
