"""``replyx bench-hostile --tiny`` end to end: the report has every key, nothing is lost,
and it finishes within a minute. Figures are the benchmark's business, not the suite's;
only what must hold on any machine is asserted (nothing lost, RSS under its bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.fix_db import TEST_JWT_SECRET


def test_tiny_hostile_bench_reports_and_loses_nothing(tmp_path: Path, database_url: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,  # the bench makes (and drops) a database of its own
        "REPLYX_DATA_DIR": str(tmp_path / "var"),
        "REPLYX_JWT_SECRET": TEST_JWT_SECRET,
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "replyx_ops.bench.hostile", "--tiny"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stderr[-800:], result.stdout[-3000:])  # the figures, for pytest -s
    assert "p99 ratio" in result.stderr  # the table went to stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert elapsed < 60, elapsed
    for phase in ("quiet", "attack"):
        latency = report[phase]["latency_ms"]
        assert latency["n"] > 0 and latency["p50"] > 0 and latency["p99"] >= latency["p50"]
        assert report[phase]["lost"] == 0 and report[phase]["closed"] == 0
    assert report["lost"] == 0 and report["bystander_sockets"] == 100
    assert report["targets_met"]["nothing_lost"] and report["targets_met"]["rss_under_bound"]
    outcomes = report["attacker"]["outcomes"]
    # The attacker stayed within the limits: its bad handshakes were refused with their
    # codes (4400 for invalid UTF-8, 4001 for made-up tokens), its protocol violations
    # answered 1002/1007, never a silent drop.
    assert outcomes.get("closed 4400", 0) > 0 and outcomes.get("closed 4001", 0) > 0, outcomes
    assert outcomes.get("violation closed 1002", 0) > 0, outcomes
    assert outcomes.get("violation closed None", 0) == 0, outcomes
