"""Where the benchmarks write their results: a second run never overwrites the first.

``bench/results`` holds committed runs named by their date; two runs on one day (or a
run into a folder that already has that day's file) must both be kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from replyx_ops.bench import rounds, workspace_report
from replyx_ops.bench.measure import result_paths


def test_a_second_result_of_the_day_is_kept_next_to_the_first(tmp_path: Path) -> None:
    first, second = {"date": "2026-12-07", "run": 1}, {"date": "2026-12-07", "run": 2}
    paths = [rounds.save(first, tmp_path), rounds.save(second, tmp_path)]
    assert [p.name for p in paths] == ["rounds-2026-12-07.json", "rounds-2026-12-07-2.json"]
    assert [json.loads(p.read_text())["run"] for p in paths] == [1, 2]
    kept = workspace_report.save(first, tmp_path / "ws")
    again = workspace_report.save(second, tmp_path / "ws")
    assert (kept.name, again.name) == ("workspace-2026-12-07.json", "workspace-2026-12-07-2.json")
    assert json.loads(kept.read_text())["run"] == 1


def test_a_stem_is_free_only_when_none_of_its_files_exist(tmp_path: Path) -> None:
    def names() -> list[str]:
        return [p.name for p in result_paths(tmp_path, "2026-12-07", (".json", ".png"))]

    assert names() == ["2026-12-07.json", "2026-12-07.png"]
    (tmp_path / "2026-12-07.png").write_bytes(b"")  # a plot without its JSON still counts
    (tmp_path / "2026-12-07-2.json").write_text("{}")
    assert names() == ["2026-12-07-3.json", "2026-12-07-3.png"]
