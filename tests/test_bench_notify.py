"""`replyx bench`'s NOTIFY ceiling (replyx_ops.bench.notify) in its tiny mode: it runs, under
60 s, and reports every listener count and both gateway counts with the generator's CPU."""

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
    assert [row["gateways"] for row in report["gateways"]] == [1, 2]
    for row in report["gateways"]:
        assert row["frames_per_s"] > 0 and row["routed_per_s"] > 0
        assert 0 < row["generator_cpu_share"] <= 1
    assert "commits/s" in result.stdout and "frames/s" in result.stdout
    assert took < 60, took
