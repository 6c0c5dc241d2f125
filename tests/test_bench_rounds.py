"""`replyx bench --rounds`: ReplyX over WebSockets, over SSE, and the peer interleaved,
with the per-stage figures.

Only the shape is checked (and that nothing is lost); the figures are measured by
the benchmark on a quiet machine, never asserted by the suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.fix_db import run_bench

BIN = Path(sys.executable).parent
STAGES = ["backend.handler", "backend.commit", "gateway.notify", "gateway.queue",
          "gateway.parse", "gateway.deliver"]


def test_rounds_interleave_both_stacks_and_both_transports_and_time_every_stage(
    tmp_path: Path, database_url: str
) -> None:
    result = run_bench(
        [str(BIN / "replyx"), "bench", "--tiny", "--rounds", "2", "--rates", "20", "--json",
         "--output", str(tmp_path / "out")],
        tmp_path, database_url,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Turns alternate: ReplyX's sockets, its event streams, the peer, and again.
    turns = [line.rsplit(": ", 1)[1] for line in result.stderr.splitlines() if "round " in line]
    assert turns == ["replyx", "replyx_sse", "peer"] * 2

    rate = report["rates"]["20"]
    posted = 20  # the tiny profile: 20 msg/s for 1 s in each measured turn
    for stack in ("replyx", "replyx_sse", "peer"):
        side = rate[stack]
        assert side["lost"] == 0
        assert len(side["rounds"]) == 2
        for key in ("p50_ms", "p99_ms", "many_dialogs_frames_per_s"):
            spread = side[key]
            assert spread["min"] <= spread["median"] <= spread["max"], (stack, key)
        for turn in side["rounds"]:
            assert turn["many_dialogs"]["frames"] == 40 * 2  # 2 per dialog on 20 dialogs x 2
            assert turn["many_dialogs"]["lost"] == 0
            # Each burst with its server's CPU (the peer's: its four workers'), which a burst
            # this small may not reach a clock tick of.
            assert turn["many_dialogs"]["server_cpu_s"] >= 0, (stack, turn["many_dialogs"])
    assert len(rate["fanout_per_cpu_ratio_per_round"]) == 2
    for key in ("fanout_ratio_per_round", "sse_p99_ratio_per_round",
                "sse_fanout_ratio_per_round"):
        assert len(rate[key]) == 2 and all(r > 0 for r in rate[key]), key
    assert {"sse_p99_within_20pct_of_ws", "sse_fanout_within_20pct_of_ws"} <= rate["targets"].keys()
    # ReplyX's own clocks: every measured message is counted once in every stage.
    for turn in rate["replyx"]["rounds"] + rate["replyx_sse"]["rounds"]:
        assert list(turn["stages"]) == STAGES
        assert all(turn["stages"][s]["count"] == posted for s in STAGES), turn["stages"]
        assert turn["stages"]["backend.commit"]["p50_ms"] > 0
    assert list(rate["stages"]) == STAGES
    assert all(word in result.stdout for word in ("replyx SSE", "peer", "p99 SSE/WS", "stages"))
    assert (tmp_path / "out" / f"rounds-{report['date']}.json").exists()
