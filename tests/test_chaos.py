"""`replyx chaos`: the seeded schedule, the checker's arithmetic, and one real soak.

The soak runs the real command for a minute against the real stack (``replyx
run``: supervisord, 4 gunicorn workers, the gateway, nginx, an embedded
Postgres of its own behind the soak's proxy) with every fault kind injected at
least once, and must find nothing: no frame lost, duplicated or reordered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replyx_client.dialog import Frame
from replyx_ops.chaos import checker
from replyx_ops.chaos.clients import KINDS, ChaosDialogClient, Subscriber, Tenancy
from replyx_ops.chaos.faults import FAULTS, KIND_SPECS
from replyx_ops.chaos.run import supports_gateways
from replyx_ops.chaos.schedule import make_schedule
from replyx_ops.chaos.writers import WriteLog
from tests.fix_db import child_environ, cluster_dir

BIN = Path(sys.executable).parent
SOAK_SEED = 15


# -- the schedule ------------------------------------------------------------------------------


def test_same_seed_gives_the_same_schedule_and_every_kind_fits() -> None:
    first = make_schedule(SOAK_SEED, 60, KIND_SPECS)
    assert first == make_schedule(SOAK_SEED, 60, KIND_SPECS)
    assert first != make_schedule(SOAK_SEED + 1, 60, KIND_SPECS)
    assert {e.kind for e in first} == set(FAULTS)
    assert [e.at for e in first] == sorted(e.at for e in first)
    assert all(3.0 <= e.at and e.ends <= 60 - 12 for e in first)  # a quiet tail to recover in
    for spec in KIND_SPECS:
        if spec.exclusive:
            spans = sorted((e.at, e.ends) for e in first if e.kind == spec.name)
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_the_command_prints_the_seeds_schedule(tmp_path: Path) -> None:
    def schedule() -> list[dict[str, object]]:
        result = subprocess.run(
            [str(BIN / "replyx"), "chaos", "--minutes", "1", "--seed", str(SOAK_SEED),
             "--schedule-only"],
            env=child_environ(REPLYX_DATA_DIR=str(tmp_path)),
            capture_output=True, text=True, timeout=60, check=True,
        )
        return list(json.loads(result.stdout))

    printed = schedule()
    assert printed == schedule()
    assert printed == [e.as_dict() for e in make_schedule(SOAK_SEED, 60, KIND_SPECS)]


@pytest.mark.skipif(supports_gateways(), reason="the stack runs several gateways now")
def test_more_than_one_gateway_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "replyx"), "chaos", "--minutes", "1", "--gateways", "2"],
        env=child_environ(REPLYX_DATA_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "REPLYX_GATEWAYS" in result.stderr and "--gateways 1" in result.stderr


# -- the checker -------------------------------------------------------------------------------


def _row(seq: int) -> checker.Row:
    return checker.Row(100 + seq, "system", checker.digest(f"m{seq}"), f"m{seq}")


def _subscriber(frames: list[list[dict[str, object]]], since: int | None = 0) -> Subscriber:
    """A subscriber of dialog 7 whose sessions received ``frames`` (never connected)."""
    tenancy = Tenancy(tenant=None, ws_base="ws://", jwt_secret=b"x" * 32)  # type: ignore[arg-type]
    sub = Subscriber("site-1", KINDS["site"], 7, since, tenancy)
    for session_frames in frames:
        session = ChaosDialogClient("ws://unused")
        for data in session_frames:
            session.frames.append(Frame(data, time.time()))
        sub.sessions.append(session)
    return sub


def _msg(seq: int, text: str | None = None, dialog_id: int = 7) -> dict[str, object]:
    return {"type": "message", "dialog_id": dialog_id, "seq": seq, "id": 100 + seq,
            "text": text if text is not None else f"m{seq}", "sender": "system"}


def _verdict(sub: Subscriber, last: int = 6, rolled_back: set[str] | None = None
             ) -> checker.Verdict:
    truth = checker.Truth({7: {s: _row(s) for s in range(1, last + 1)}}, {7: last}, time.time())
    writes = WriteLog(rolled_back=rolled_back or set())
    return checker.check([sub], {sub.name: sub.received()}, truth, writes, final=True)


def test_checker_passes_a_clean_stream_across_reconnects() -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    ready = {"type": "ready", "dialog_id": 7, "last_seq": 0}
    sub = _subscriber([[ready, _msg(1), _msg(2)], [ready, _msg(3)], [_msg(4), _msg(5), _msg(6)]])
    verdict = _verdict(sub)
    assert verdict.ok, verdict.divergences
    assert verdict.messages_checked == 6


def test_checker_counts_lost_duplicated_reordered_mismatched_foreign_and_phantom() -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    sub = _subscriber([
        [_msg(1), _msg(3), _msg(2)],  # 2 after 3: reordered
        # a duplicate, a text that is not the row's, another dialog's frame
        [_msg(3), _msg(4, text="not the row"), _msg(1, dialog_id=8)],
        [_msg(6, text="rolled back one")],  # 5 never came; 6's text was rolled back
    ])
    verdict = _verdict(sub, rolled_back={"rolled back one"})
    counts = verdict.counts
    assert counts["reordered"] == 1
    assert counts["duplicated"] == 1
    assert counts["mismatch"] == 2  # seq 4's text, and seq 6's
    assert counts["foreign"] == 1
    assert counts["phantom"] == 1
    assert counts["lost"] == 1
    first = verdict.first()
    assert first is not None and first.kind == "reordered" and first.got["seq"] == 2


def test_checker_starts_a_socket_without_since_where_its_replay_starts() -> None:
    # Joining "from now on" at last seq 3 while seq 4 commits: 4 is replayed before ready.
    asyncio.set_event_loop(asyncio.new_event_loop())
    ready = {"type": "ready", "dialog_id": 7, "last_seq": 4}
    sub = _subscriber([[_msg(4), ready, _msg(5), _msg(6)]], since=None)
    assert sub.start_seq == 3
    assert _verdict(sub).ok
    late = _subscriber([[ready, _msg(5), _msg(6)]], since=None)
    assert late.start_seq == 4 and _verdict(late).ok


def test_checker_wants_the_tail_at_the_end_and_only_a_prefix_before() -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    sub = _subscriber([[_msg(1), _msg(2)]])
    assert _verdict(sub).counts["lost"] == 4
    assert _verdict(sub).not_caught_up == ["site-1"]
    truth = checker.Truth({7: {s: _row(s) for s in range(1, 7)}}, {7: 6}, time.time())
    midway = checker.check([sub], {sub.name: sub.received()}, truth, WriteLog(), final=False)
    assert midway.ok


# -- the soak ----------------------------------------------------------------------------------


@pytest.mark.timeout(600)  # the soak's own limit is 400 s (81 s on a quiet machine)
def test_one_minute_soak_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Outside pytest's tmp dirs: the embedded Postgres (run as pgserver under root) must reach
    # it; and no DATABASE_URL, so the soak has a server of its own that it may crash.
    with cluster_dir() as data_dir:
        env = child_environ(REPLYX_DATA_DIR=str(data_dir))
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "replyx"), "chaos", "--minutes", "1", "--seed", str(SOAK_SEED), "--json",
             "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=400, check=False,
        )
        wall = time.monotonic() - started
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, (report.get("checks"), report.get("first_divergence"),
                                    result.stderr[-3000:])
    assert report["ok"] and all(report["checks"].values())
    assert (report["lost"], report["duplicated"], report["reordered"]) == (0, 0, 0)
    assert report["mismatch"] == report["foreign"] == report["phantom"] == 0
    assert report["first_divergence"] is None
    assert report["stale_inbox"] == 0 and report["inbox"]["updates"] > 0  # inbox = the rows
    assert {k for k, n in report["faults_injected"].items() if n >= 1} == set(FAULTS)
    assert report["messages_checked"] > report["rows"] > 100
    assert report["sockets"]["token_renewals"] >= 1  # a panel met 4001 and logged in again
    assert report["writes"]["rolled_back"] > 0 and report["writes"]["acked_missing"] == 0
    assert report["health_end"] == {"gateway": 200, "backend": 200, "nginx": 200} or (
        "nginx" not in report["health_end"])
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".png"]
    assert json.loads(Path(report["files"]["json"]).read_text())["seed"] == SOAK_SEED
    assert "seed 15" in result.stderr  # the schedule is printed before the soak
    assert wall < 150
