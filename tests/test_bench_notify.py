"""`replyx bench`'s NOTIFY ceiling (replyx_ops.bench.notify) in its tiny mode: it runs, under
60 s, and reports every listener count and both gateway counts with the generator's CPU:
the dialog latency and the burst with 1 and 2 gateways, nothing lost, and idle sockets
spread over 2 gateways per GB of their RSS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.fix_db import child_environ


def test_notify_bench_tiny_reports_every_row(tmp_path: Path, database_url: str) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "replyx_ops.bench.notify", "--tiny", "--json"],
        env=child_environ(DATABASE_URL=database_url, REPLYX_DATA_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=120, check=False,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads(result.stdout.splitlines()[-1])
    # Every count ran, but those a server's max_connections has no room for (the embedded
    # server takes them all; Postgres' default of 100 does not take 128).
    ran = [row["listeners"] for row in report["commits"]]
    assert sorted(ran + report["skipped_listeners"]) == [1, 2, 8, 32, 128]
    assert ran[:3] == [1, 2, 8]
    assert all(row["commits_per_s"] > 0 for row in report["commits"])
    # Every listener drained what the commits sent (each message sends at least one NOTIFY).
    assert all(row["notifications_per_s_per_listener"] > 0 for row in report["commits"])
    # Postgres's CPU is its own server's (None when that server runs on another machine).
    assert all(row["postgres_cpu_share"] is None or 0 < row["postgres_cpu_share"] <= 1
               for row in report["commits"])
    assert [row["gateways"] for row in report["gateways"]] == [1, 2]
    for row in report["gateways"]:
        assert row["frames_per_s"] > 0 and row["routed_per_s"] > 0
        assert 0 < row["generator_cpu_share"] <= 1
        # Commit -> frame at every one of the 200 sockets, compared with the database.
        assert row["sockets"] == 200
        assert set(row["latency_ms"]) == {"p50", "p90", "p99", "max"}
        assert all(row["latency_ms"][k] > 0 for k in row["latency_ms"])
        assert (row["lost"], row["duplicates"], row["gaps"]) == (0, 0, 0)
        assert 0 < row["latency_generator_cpu_share"] <= 1
        assert 0 < row["latency_gateways_cpu_share"] <= 1
    assert report["lost"] == 0
    assert report["two_vs_one"]["frames_per_s"] > 0
    idle = report["idle"]
    assert idle["gateways"] == 2 and idle["sockets"] == 400
    assert idle["sockets_per_gateway"] == [200, 200]  # each gateway's own /health count
    assert idle["rss_mb_after"] > idle["rss_mb_before"] > 0
    assert idle["sockets_per_gb"] > 0
    assert "commits/s" in result.stdout and "frames/s" in result.stdout
    assert "commit→frame" in result.stdout and "sockets per GB" in result.stdout
    assert took < 60, took
