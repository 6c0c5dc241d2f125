"""`replyx bench-workspace --tiny` end to end: every number is produced and nothing is lost.

Only the shape is checked; the figures are measured on a quiet machine, never asserted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.fix_db import run_bench


def _numbers(value: Any, where: str = "") -> list[str]:
    """The paths of every missing (None) number in ``value``."""
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _numbers(v, f"{where}.{k}")]
    return []


def test_tiny_workspace_bench_reports_every_number_and_loses_nothing(
    tmp_path: Path, database_url: str
) -> None:
    out = tmp_path / "out"
    result = run_bench(
        [sys.executable, "-m", "replyx_ops.bench.workspace", "--tiny", "--json",
         "--output", str(out)],
        tmp_path, database_url,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phase 5, churn" in result.stderr  # progress went to stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out / f"workspace-{report['date']}.json").exists()

    inbox, presence = report["inbox"], report["presence"]
    assert report["lost"] == 0
    assert inbox["lost"] == 0
    assert inbox["inbox_sockets"] == 20
    # Every message reaches each of its assistant's 5 inboxes.
    assert inbox["frames"] == 5 * report["detail"]["inbox"]["messages"]
    assert presence["connects"] > 0 and presence["churn_failed"] == 0
    statements = presence["pg_presence_statements_per_s"]
    assert presence["pg_presence_statements_per_s"]["churn"] > statements["steady"]
    # The control churn changes no one's presence: nothing is published for it.
    assert report["detail"]["churn_tabs"]["pg"]["presence_publishes_per_s"] < (
        report["detail"]["churn"]["pg"]["presence_publishes_per_s"])
    assert presence["presence_cpu_added_pct"] is not None
    # Every number is present (pg_presence_xacts_added_per_s may not be: it is a difference).
    for section in ("inbox", "presence"):
        assert _numbers(report[section], section) == []
    for phase in ("dialogs_only", "inbox", "steady", "churn", "churn_tabs"):
        detail = report["detail"][phase]
        assert detail["dialog_lost"] == 0 and detail["http_errors"] == 0
        assert _numbers({k: v for k, v in detail.items() if k not in ("pg", "gateway_gc")},
                        phase) == []
        # The gateway's garbage collections in the phase, by generation (none is fine).
        gc = detail["gateway_gc"]
        assert sorted(gc) == ["0", "1", "2"]
        assert all(isinstance(g["collections"], int) and (g["longest_under_ms"] is None)
                   == (g["collections"] == 0) for g in gc.values()), gc
