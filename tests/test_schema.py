"""The database does the ordering: seq per dialog, gap-free, in commit order, NOTIFY on commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from replyx import schema
from replyx.protocol import NOTIFY_CHANNEL
from replyx.settings import Settings
from tests.fix_db import Tenant, create_tenant, make_settings, new_database, run_async


def new_dialog(sql: psycopg.Connection[Any], tenant: Tenant, channel: str = "site") -> int:
    row = sql.execute(
        "INSERT INTO dialogs (assistant_id, channel) VALUES (%s, %s) RETURNING id",
        (tenant.assistant_id, channel),
    ).fetchone()
    assert row is not None
    return row[0]


INSERT = "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, %s, %s)"
INSERT_SEQ = "INSERT INTO messages (dialog_id, seq, sender, text) VALUES (%s, %s, 'visitor', 'x')"


def seqs(sql: psycopg.Connection[Any], dialog_id: int) -> list[int]:
    rows = sql.execute(
        "SELECT seq FROM messages WHERE dialog_id = %s ORDER BY seq", (dialog_id,)
    ).fetchall()
    return [r[0] for r in rows]


def test_seq_is_assigned_per_dialog(sql: psycopg.Connection[Any], tenant: Tenant) -> None:
    a, b = new_dialog(sql, tenant), new_dialog(sql, tenant)
    for dialog in (a, b, a, a, b):
        sql.execute(
            "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', 'x')", (dialog,)
        )
    assert seqs(sql, a) == [1, 2, 3]
    assert seqs(sql, b) == [1, 2]
    assert sql.execute("SELECT last_seq FROM dialogs WHERE id = %s", (a,)).fetchone() == (3,)


def test_rollback_leaves_no_hole(sql: psycopg.Connection[Any], database_url: str,
                                 tenant: Tenant) -> None:
    dialog = new_dialog(sql, tenant)
    sql.execute("INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', '1')",
                (dialog,))
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', 'no')",
                     (dialog,))
        conn.rollback()
    sql.execute("INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', '2')",
                (dialog,))
    assert seqs(sql, dialog) == [1, 2]


def test_explicit_wrong_seq_is_refused(sql: psycopg.Connection[Any], tenant: Tenant) -> None:
    dialog = new_dialog(sql, tenant)
    with pytest.raises(psycopg.errors.CheckViolation, match="assigned by the database"):
        sql.execute(INSERT_SEQ, (dialog, 7))
    sql.execute(INSERT_SEQ, (dialog, 1))
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("UPDATE messages SET seq = 5 WHERE dialog_id = %s", (dialog,))
    assert seqs(sql, dialog) == [1]


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_second_writer_waits_for_the_first_and_gets_the_next_seq(
    database_url: str, sql: psycopg.Connection[Any], tenant: Tenant, first_commits: bool
) -> None:
    """seq is taken under the dialog's row lock, held to commit: a second writer waits for the
    first, then gets the seq after the first's if it committed, or its seq if it rolled back.

    Checked: with replyx_assign_seq() in migrations/versions/0001_initial.py locally changed
    to read max(seq) + 1 before taking the row lock, the second writer gets no seq (a unique
    violation) and this fails; so does the test below, while the old concurrent test passed.
    """
    dialog = new_dialog(sql, tenant)
    sql.execute(INSERT, (dialog, "visitor", "0"))
    second_seq: list[int] = []
    second_pid: list[int] = []

    def second() -> None:
        with psycopg.connect(database_url) as conn:
            second_pid.append(conn.info.backend_pid)
            row = conn.execute(INSERT + " RETURNING seq", (dialog, "visitor", "second")).fetchone()
            second_seq.append(row[0])

    with psycopg.connect(database_url) as first:
        row = first.execute(INSERT + " RETURNING seq", (dialog, "visitor", "first")).fetchone()
        assert row == (2,)
        writer = threading.Thread(target=second)
        writer.start()
        # The second INSERT is parked on the dialog's row lock, not merely slow.
        deadline = time.monotonic() + 10
        while not (second_pid and sql.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                (second_pid[0],)).fetchone() == ("Lock",)):
            assert not second_seq, f"the second writer got seq {second_seq} without waiting"
            assert time.monotonic() < deadline, "the second writer never waited on a lock"
            time.sleep(0.02)
        assert not second_seq
        if first_commits:
            first.commit()
        else:
            first.rollback()
        writer.join(10)
    expected = [1, 2, 3] if first_commits else [1, 2]
    assert second_seq == [expected[-1]]
    assert seqs(sql, dialog) == expected


def test_concurrent_writers_get_gap_free_seqs_notified_in_seq_order(
    database_url: str, sql: psycopg.Connection[Any], tenant: Tenant
) -> None:
    """Many transactions on one dialog at once: no holes, and a LISTEN sees the dialog's
    notifications in seq order, which is commit order (NOTIFYs are delivered on commit,
    in commit order)."""
    dialog = new_dialog(sql, tenant)
    committed: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        with psycopg.connect(database_url) as conn:
            for i in range(10):
                row = conn.execute(INSERT + " RETURNING seq", (dialog, "visitor", f"{n}-{i}"),
                                   ).fetchone()
                if i % 3 == 0:
                    conn.rollback()
                    continue
                conn.commit()
                with lock:
                    committed.append(row[0])

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = len(committed)
        # Each message is followed by its dialog's new state (for inboxes): 2 per commit.
        payloads = [orjson.loads(n.payload)
                    for n in listener.notifies(timeout=10, stop_after=2 * total)]
        notified = [p["seq"] for p in payloads if p["type"] == "message"]
        states = [p["last_seq"] for p in payloads if p["type"] == "dialog"]
        assert states == notified  # each dialog state right after its message
    assert total == 8 * 6
    assert sorted(committed) == list(range(1, total + 1))
    assert seqs(sql, dialog) == list(range(1, total + 1))
    assert notified == list(range(1, total + 1))


def test_notify_fires_on_commit_only_for_any_writer(
    database_url: str, sql: psycopg.Connection[Any], tenant: Tenant
) -> None:
    """A psql-style INSERT notifies on commit; a rolled-back one never does."""
    dialog = new_dialog(sql, tenant)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with psycopg.connect(database_url) as writer:
            writer.execute(INSERT, (dialog, "system", "gone"))
            writer.rollback()
            writer.execute(INSERT, (dialog, "system", "kept"))
            writer.commit()
        # The message, then its dialog's new state (for inboxes); nothing of the rollback.
        payloads = [n.payload for n in listener.notifies(timeout=2, stop_after=2)]
        assert len(payloads) == 2
        assert '"text":"kept"' in payloads[0]
        assert f'"dialog_id":{dialog},"seq":1,' in payloads[0]
        assert payloads[1].startswith('{"type" : "dialog"') and '"last_seq" : 1,' in payloads[1]
        assert list(listener.notifies(timeout=0.3)) == []


def test_an_insert_of_many_rows_sends_each_dialogs_state_once_after_its_messages(
    database_url: str, sql: psycopg.Connection[Any], tenant: Tenant
) -> None:
    """One statement writing 4 messages to each of 3 dialogs: 12 messages, then 3 states.

    Each state is the dialog's state after the whole statement (last_seq 4, unread 4), not
    one stale state per row; the next single-row INSERT still sends message, then state.
    """
    dialogs = [new_dialog(sql, tenant) for _ in range(3)]
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        sql.execute(
            "INSERT INTO messages (dialog_id, sender, text)"
            " SELECT d, 'visitor', 'm' || i FROM generate_series(1, 4) i, unnest(%s::bigint[]) d",
            (dialogs,),
        )
        sql.execute(INSERT, (dialogs[0], "visitor", "alone"))
        payloads = [orjson.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=17)]
        assert list(listener.notifies(timeout=0.3)) == []
    kinds = [p["type"] for p in payloads]
    assert kinds == ["message"] * 12 + ["dialog"] * 3 + ["message", "dialog"]
    states = payloads[12:15]
    assert [(p["dialog_id"], p["last_seq"], p["unread"]) for p in states] == [
        (d, 4, 4) for d in sorted(dialogs)
    ]
    assert all(p["last_message"]["seq"] == 4 for p in states)
    assert (payloads[15]["text"], payloads[15]["seq"]) == ("alone", 5)
    assert (payloads[16]["dialog_id"], payloads[16]["last_seq"]) == (dialogs[0], 5)


def test_message_json_is_the_frame(sql: psycopg.Connection[Any], tenant: Tenant) -> None:
    dialog = new_dialog(sql, tenant)
    text = 'quotes " backslash \\ newline \n emoji 😀 tab \t'
    row = sql.execute(
        "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', %s)"
        " RETURNING replyx_message_json(messages)", (dialog, text),
    ).fetchone()
    frame = orjson.loads(row[0])
    assert list(frame) == ["type", "dialog_id", "seq", "id", "sender", "text", "created_at"]
    assert frame["text"] == text
    assert frame["created_at"].endswith("Z")


def test_big_message_notifies_a_reference(
    database_url: str, sql: psycopg.Connection[Any], tenant: Tenant
) -> None:
    dialog = new_dialog(sql, tenant)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        sql.execute("INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', %s)",
                    (dialog, "ж" * 30_000))
        payload = next(iter(listener.notifies(timeout=2, stop_after=1))).payload
    assert payload.startswith('{"type":"message_ref"')
    assert len(payload.encode()) < 8000


def test_processes_refuse_a_schema_not_at_head(tmp_path: Path, database_url: str) -> None:
    """Backend and gateway refuse to start on an unmigrated database and name the fix."""
    from backend.app import make_app
    from ws_gateway.app import Gateway

    with new_database(database_url, "replyx_empty") as empty:
        settings: Settings = make_settings(tmp_path)
        with pytest.raises(schema.SchemaMismatchError, match="run `replyx migrate`"):
            make_app(settings, database_url=empty)
        with pytest.raises(schema.SchemaMismatchError, match="run `replyx migrate`"):
            run_async(lambda: Gateway(settings, empty).start(port=0))


def test_migrations_downgrade_and_upgrade_again(database_url: str) -> None:

    with new_database(database_url, "replyx_mig") as url:
        schema.upgrade(url)
        assert schema.current_revision(url) == schema.head_revision()
        schema.downgrade(url, "base")
        assert schema.current_revision(url) is None
        schema.upgrade(url)
        assert schema.current_revision(url) == schema.head_revision()


def test_a_dialogs_state_renders_as_before_with_a_plan_each_session_keeps(
    database_url: str,
) -> None:
    """Migration 0008 only changes replyx_dialog_json's language (sql → plpgsql, so its
    subquery is not planned again by every statement that calls it): every byte of the
    inbox's ``dialog`` frame is the one the 0007 function rendered."""
    with new_database(database_url, "replyx_mig") as url:
        schema.upgrade(url)
        tenant = create_tenant(url)
        with psycopg.connect(url, autocommit=True) as sql:
            dialogs = [new_dialog(sql, tenant, channel) for channel in ("site", "widget")]
            sql.execute(INSERT, (dialogs[0], "visitor", 'a "quoted" ' + "ж" * 300))
            sql.execute(INSERT, (dialogs[0], "operator", "answer\n"))
            sql.execute("UPDATE dialogs SET operator_read_seq = 1 WHERE id = %s", (dialogs[0],))
            render = ("SELECT replyx_dialog_json(d) FROM dialogs d WHERE d.id = ANY(%s)"
                      " ORDER BY d.id")

            def rendered() -> list[str]:
                return [row[0] for row in sql.execute(render, (dialogs,)).fetchall()]

            def language() -> str:
                row = sql.execute("SELECT l.lanname FROM pg_proc p JOIN pg_language l"
                                  " ON l.oid = p.prolang WHERE p.proname = 'replyx_dialog_json'"
                                  ).fetchone()
                assert row is not None
                return str(row[0])

            now = rendered()
            assert language() == "plpgsql"
            schema.downgrade(url, "0007_dialog_state_per_statement")
            assert (language(), rendered()) == ("sql", now)
            schema.upgrade(url)
            assert (language(), rendered()) == ("plpgsql", now)
    first = orjson.loads(now[0])
    assert (first["last_seq"], first["operator_read_seq"], first["unread"]) == (2, 1, 0)
    assert first["last_message"]["text"] == "answer\n"


def test_messages_are_append_only(sql: psycopg.Connection[Any], tenant: Tenant) -> None:
    """Deleting one message would leave a hole in seq; deleting the dialog takes them all."""
    dialog = new_dialog(sql, tenant)
    for text in ("one", "two"):
        sql.execute(INSERT, (dialog, "visitor", text))
    with pytest.raises(psycopg.errors.CheckViolation, match="append-only"):
        sql.execute("DELETE FROM messages WHERE dialog_id = %s AND seq = 1", (dialog,))
    sql.execute("UPDATE messages SET text = '[removed]' WHERE dialog_id = %s AND seq = 1",
                (dialog,))
    assert seqs(sql, dialog) == [1, 2]
    sql.execute("DELETE FROM dialogs WHERE id = %s", (dialog,))
    assert seqs(sql, dialog) == []
