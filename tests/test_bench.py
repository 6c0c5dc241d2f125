"""`replyx bench` end to end on a tiny workload: every key is produced and nothing is lost,
over WebSockets and, in the same run, over server-sent events.

Only the shape is checked here; the figures themselves are measured by the
benchmark on a quiet machine, never asserted by the suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from replyx_ops.bench.measure import PORTS_FROM, free_port
from replyx_ops.stack import port_in_use
from tests.fix_db import run_bench

BIN = Path(sys.executable).parent

LATENCY_KEYS = {"latency_ms", "sockets", "rate_msgs_per_s", "lost", "fanout_frames_per_s"}


def test_tiny_bench_reports_every_key_and_loses_nothing(tmp_path: Path, database_url: str) -> None:
    result = run_bench(
        [str(BIN / "replyx"), "bench", "--tiny", "--json", "--output", str(tmp_path / "out")],
        tmp_path, database_url,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latency" in result.stderr  # progress went to stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert LATENCY_KEYS | {
        "naive_fanout_frames_per_s", "notify_route_per_s", "pg_commit_per_s",
        "rss_kb_per_socket", "peer",
    } <= report.keys()
    assert LATENCY_KEYS | {"notify_route_per_s", "rss_kb_per_socket"} <= report["peer"].keys()
    for side in (report, report["peer"]):
        assert set(side["latency_ms"]) == {"p50", "p90", "p99", "max"}
        assert all(side["latency_ms"][k] > 0 for k in ("p50", "p90", "p99", "max"))
        assert side["lost"] == 0
        assert side["sockets"] == 40  # admin + widget/site on each of 20 dialogs
        assert side["fanout_frames_per_s"] > 0
        assert side["rss_kb_per_socket"] is not None
    assert report["naive_fanout_frames_per_s"] > 0

    # The same latency and fan-out phases over event streams, next to the sockets' numbers.
    sse = report["sse"]
    assert sse["sockets"] == 40
    assert all(sse["latency_ms"][k] > 0 for k in ("p50", "p90", "p99", "max"))
    assert (sse["lost"], sse["duplicates"], sse["gaps"]) == (0, 0, 0)
    assert sse["fanout_one_dialog_frames_per_s"] > 0
    assert sse["fanout_many_dialogs_frames_per_s"] > 0
    assert sse["fanout_frames_per_s"] > 0 and sse["fanout_vs_ws"] > 0
    assert {"sse_p99_within_20pct", "sse_fanout_within_20pct"} <= report["targets"].keys()
    assert "SSE fan-out frames/s" in result.stdout
    assert report["notify_route_per_s"] > 0 and report["pg_commit_per_s"] > 0

    # The table and the written files.
    assert "fan-out frames/s" in result.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"{report['date']}.json", f"{report['date']}.png"]
    assert json.loads((tmp_path / "out" / f"{report['date']}.json").read_text())["lost"] == 0


def test_free_ports_are_consecutive_bindable_and_below_the_ephemeral_range() -> None:
    """A client connection's own port must never take a stack's GATEWAY_PORT+1 first."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for count in (1, 3):
        base = free_port(count)
        assert PORTS_FROM <= base and base + count <= low
        # Free as `replyx run`'s own preflight sees it (a server's bind, SO_REUSEADDR).
        assert not any(port_in_use("127.0.0.1", port) for port in range(base, base + count))
