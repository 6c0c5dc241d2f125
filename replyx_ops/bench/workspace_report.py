"""``replyx bench-workspace`` results: Postgres counters, the summary, the table, the file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg

from replyx_ops.bench.measure import result_paths
from replyx_ops.bench.servers import BenchDatabase

PRESENCE_TABLES = ["gateways", "presence_operators", "presence_visitors", "presence_version"]
# Statements the presence code runs (store.PresenceStore); the counting query itself excluded.
PRESENCE_STATEMENTS = r"(presence_|gateways|pg_advisory_xact_lock|pg_notify\()"
CPU_ADDED_TARGET_PCT = 10.0

METHOD_STATEMENTS = "pg_stat_statements (calls of the presence statements)"
METHOD_COUNTERS = ("pg_stat_user_tables on the presence tables: publishes (presence_version"
                   " upserts) x 9 + heartbeats (gateways updates) x 3 statements")
PUBLISH_STATEMENTS = 9
BEAT_STATEMENTS = 3


def pg_counters(db: BenchDatabase) -> dict[str, float | None]:
    with db.connect() as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()").fetchone()
        tables = {r[0]: (float(r[1]), float(r[2]), float(r[3])) for r in conn.execute(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del,"
            " coalesce(seq_scan, 0) + coalesce(idx_scan, 0), n_tup_ins + n_tup_upd"
            " FROM pg_stat_user_tables WHERE relname = ANY(%s)", (PRESENCE_TABLES,))}
        statements = _statements(conn)
    assert row is not None
    return {
        "xacts": float(row[0]),
        "rows": sum(t[0] for t in tables.values()),
        "scans": sum(t[1] for t in tables.values()),
        # One presence_version upsert per publish (and per sweep that found a dead gateway),
        # one gateways UPDATE per heartbeat: presence's transactions, counted exactly.
        "publishes": tables.get("presence_version", (0.0, 0.0, 0.0))[2],
        "heartbeats": tables.get("gateways", (0.0, 0.0, 0.0))[2],
        "statements": statements,
    }


def _statements(conn: psycopg.Connection[Any]) -> float | None:
    """Presence statement calls, when the server has pg_stat_statements loaded."""
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            row = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid AND d.datname = current_database()"
                " WHERE s.query ~* %s AND s.query !~* 'pg_stat_statements'",
                (PRESENCE_STATEMENTS,)).fetchone()
    except psycopg.Error:
        return None
    return float(row[0]) if row else None


def pg_rates(before: dict[str, float | None], after: dict[str, float | None], seconds: float
             ) -> dict[str, Any]:
    def rate(key: str) -> float | None:
        a, b = after[key], before[key]
        return None if a is None or b is None else round((a - b) / seconds, 1)

    statements, method = rate("statements"), METHOD_STATEMENTS
    publishes, heartbeats = rate("publishes"), rate("heartbeats")
    if statements is None and publishes is not None and heartbeats is not None:
        # The statements store.PresenceStore runs: a publish is 9 (lock, 2 DELETE,
        # 2 INSERT, 2 total SELECTs, version upsert, pg_notify), a beat 3 (UPDATE, lock,
        # SELECT of expired leases).
        statements = round(PUBLISH_STATEMENTS * publishes + BEAT_STATEMENTS * heartbeats, 1)
        method = METHOD_COUNTERS
    return {"xacts_per_s": rate("xacts"), "presence_rows_per_s": rate("rows"),
            "presence_scans_per_s": rate("scans"), "presence_publishes_per_s": publishes,
            "presence_heartbeats_per_s": heartbeats, "presence_statements_per_s": statements,
            "method": method}


def _added_pct(value: float, base: float) -> float | None:
    """How much more ``value`` is than ``base``, in per cent (None without a base)."""
    return round(100 * (value - base) / base, 1) if base else None


def summarise(phases: dict[str, Any], scenario: dict[str, Any]) -> dict[str, Any]:
    plain, inbox, steady, churn, tabs = (phases[k] for k in (
        "dialogs_only", "inbox", "steady", "churn", "churn_tabs"))
    box = inbox["inbox"]
    dialog_p99 = inbox["dialog_latency_ms"]["p99"]
    cpu_steady, cpu_churn = steady["gateway_cpu_share"], churn["gateway_cpu_share"]
    added = _added_pct(cpu_churn, cpu_steady)
    # The same churn with nothing for presence to publish (phase 5): the rest is presence's.
    cpu_tabs = tabs["gateway_cpu_share"]
    presence_added = _added_pct(cpu_churn, cpu_tabs)
    statements = churn["pg"]["presence_statements_per_s"]
    # Both phases post the same messages for the same time: the difference is the churn's.
    connects = churn["churn"]["connects"]
    per_churn = (round(1000 * (churn["gateway_cpu_s"] - steady["gateway_cpu_s"]) / connects, 3)
                 if connects else None)
    xacts_added = None
    if churn["pg"]["xacts_per_s"] is not None and steady["pg"]["xacts_per_s"] is not None:
        xacts_added = round(churn["pg"]["xacts_per_s"] - steady["pg"]["xacts_per_s"], 1)
    lost = sum(p["dialog_lost"] + p["http_errors"] + p.get("inbox", {}).get("lost", 0)
               + p.get("inbox", {}).get("gaps", 0) for p in (plain, inbox, steady, churn, tabs))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "inbox": {
            "operators": scenario["operators"], "assistants": scenario["assistants"],
            "dialogs": scenario["dialogs"], "inbox_sockets": box["sockets"],
            "rate_msgs_per_s": inbox["rate_msgs_per_s"],
            "latency_ms": box["latency_ms"], "from_insert_ms": box["from_insert_ms"],
            "frames": box["frames"], "lost": box["lost"] + box["gaps"],
            "dialog_sockets": inbox["dialog_sockets"],
            "dialog_latency_ms": inbox["dialog_latency_ms"],
            # The same, to the frames' arrival at the load generator's kernel: without the
            # wait in its read queue (it reads 10 inbox frames per message, and 1 dialog frame).
            "arrival_ms": box.get("arrival_ms"),
            "dialog_arrival_ms": inbox.get("dialog_arrival_ms"),
            "gateway_cpu_ms_per_msg": {"without_inbox": plain["gateway_cpu_ms_per_msg"],
                                       "with_inbox": inbox["gateway_cpu_ms_per_msg"]},
        },
        "presence": {
            "sockets": phases["sockets"], "churn_per_s": scenario["churn"],
            "connects": churn["churn"]["connects"], "disconnects": churn["churn"]["disconnects"],
            "churn_failed": churn["churn"]["failed"],
            "gateway_cpu_share": {"steady": cpu_steady, "churn": cpu_churn,
                                  "churn_no_presence_change": cpu_tabs},
            "gateway_cpu_added_pct": added,
            "presence_cpu_added_pct": presence_added,
            "gateway_cpu_ms_per_connect_disconnect": per_churn,
            "pg_method": churn["pg"]["method"],
            "pg_presence_statements_per_s": {
                "steady": steady["pg"]["presence_statements_per_s"], "churn": statements,
                "churn_no_presence_change": tabs["pg"]["presence_statements_per_s"]},
            "pg_presence_publishes_per_s": {"steady": steady["pg"]["presence_publishes_per_s"],
                                            "churn": churn["pg"]["presence_publishes_per_s"]},
            "pg_xacts_per_s": {"steady": steady["pg"]["xacts_per_s"],
                               "churn": churn["pg"]["xacts_per_s"]},
            "pg_presence_xacts_added_per_s": xacts_added,
            "pg_presence_rows_per_s": {"steady": steady["pg"]["presence_rows_per_s"],
                                       "churn": churn["pg"]["presence_rows_per_s"]},
            "pg_presence_scans_per_s": {"steady": steady["pg"]["presence_scans_per_s"],
                                        "churn": churn["pg"]["presence_scans_per_s"]},
            "dialog_p99_ms": {"steady": steady["dialog_latency_ms"]["p99"],
                              "churn": churn["dialog_latency_ms"]["p99"],
                              "churn_no_presence_change": tabs["dialog_latency_ms"]["p99"]},
            "inbox_p99_ms": {"steady": steady["inbox"]["latency_ms"]["p99"],
                             "churn": churn["inbox"]["latency_ms"]["p99"]},
        },
        "lost": lost,
        "detail": phases,
        "scenario": scenario,
    }
    p99 = box["latency_ms"]["p99"]
    result["targets"] = {
        "inbox_p99_within_dialog_p99": p99 is not None and dialog_p99 is not None
        and p99 <= dialog_p99,
        "presence_cpu_under_10pct": (presence_added is not None
                                     and presence_added < CPU_ADDED_TARGET_PCT),
        "lost_zero": lost == 0,
    }
    return result


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def table(r: dict[str, Any]) -> str:
    box, pres = r["inbox"], r["presence"]
    lat, dlat = box["latency_ms"], box["dialog_latency_ms"]
    cpu = box["gateway_cpu_ms_per_msg"]
    rows = [
        ("inbox scenario", "value", "compare", "target"),
        ("operators / assistants / dialogs",
         f"{box['operators']} / {box['assistants']} / {box['dialogs']}", "", ""),
        ("rate msgs/s", _fmt(box["rate_msgs_per_s"]), "", ""),
        ("inbox frame p50 / p99 ms", f"{_fmt(lat['p50'])} / {_fmt(lat['p99'])}",
         f"dialog socket {_fmt(dlat['p50'])} / {_fmt(dlat['p99'])}", "p99 ≤ dialog p99"),
        *([("  at arrival (kernel) p50 / p99 ms",
             f"{_fmt(box['arrival_ms']['p50'])} / {_fmt(box['arrival_ms']['p99'])}",
             f"dialog socket {_fmt(box['dialog_arrival_ms']['p50'])}"
             f" / {_fmt(box['dialog_arrival_ms']['p99'])}", "")]
           if box.get("arrival_ms") and box.get("dialog_arrival_ms") else []),
        ("inbox frames (lost)", f"{_fmt(box['frames'])} ({box['lost']})", "", "0 lost"),
        ("gateway CPU ms/msg", _fmt(cpu["with_inbox"]), f"no inboxes {_fmt(cpu['without_inbox'])}",
         "flat"),
        ("presence scenario", "churn", "steady", ""),
        ("sockets, churn/s", f"{_fmt(pres['sockets'])}, {_fmt(pres['churn_per_s'])}",
         f"{pres['connects']} connects, {pres['disconnects']} disconnects", ""),
        ("gateway CPU share", _fmt(pres["gateway_cpu_share"]["churn"]),
         _fmt(pres["gateway_cpu_share"]["steady"]),
         f"+{_fmt(pres['gateway_cpu_added_pct'])} % (handshakes included)"),
        ("  same churn, no presence change",
         _fmt(pres["gateway_cpu_share"]["churn_no_presence_change"]), "",
         f"presence +{_fmt(pres['presence_cpu_added_pct'])} % (< 10 %)"),
        ("gateway CPU ms per connect+disconnect",
         _fmt(pres["gateway_cpu_ms_per_connect_disconnect"]), "", ""),
        ("dialog p99 ms", _fmt(pres["dialog_p99_ms"]["churn"]),
         _fmt(pres["dialog_p99_ms"]["steady"]),
         "within noise (no presence change: "
         + _fmt(pres["dialog_p99_ms"]["churn_no_presence_change"]) + ")"),
        ("Postgres xacts/s", _fmt(pres["pg_xacts_per_s"]["churn"]),
         _fmt(pres["pg_xacts_per_s"]["steady"]), "(all of the database's)"),
        ("presence rows written/s", _fmt(pres["pg_presence_rows_per_s"]["churn"]),
         _fmt(pres["pg_presence_rows_per_s"]["steady"]), ""),
        ("presence publishes/s", _fmt(pres["pg_presence_publishes_per_s"]["churn"]),
         _fmt(pres["pg_presence_publishes_per_s"]["steady"]), ""),
        ("presence statements/s", _fmt(pres["pg_presence_statements_per_s"]["churn"]),
         _fmt(pres["pg_presence_statements_per_s"]["steady"]), ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    missed = [name for name, ok in r["targets"].items() if not ok]
    lines += ["", f"Postgres counted by {pres['pg_method']}",
              "targets missed: " + (", ".join(missed) if missed else "none")]
    return "\n".join(lines)


def save(r: dict[str, Any], output: Path) -> Path:
    (path,) = result_paths(output, f"workspace-{r['date']}")
    path.write_text(json.dumps(r, indent=2) + "\n")
    return path
