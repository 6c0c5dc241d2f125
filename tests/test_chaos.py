"""`replyx chaos`: the seeded schedule, the checker's arithmetic, and one real soak.

The soak runs the real command for a minute against the real stack (``replyx
run``: supervisord, 4 gunicorn workers, two gateways behind nginx, an embedded
Postgres of its own behind the soak's proxy) with every fault kind injected at
least once, sockets and SSE streams of every kind, and must find nothing: no
frame lost, duplicated or reordered, no stale inbox entry, no ghost presence.
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
from replyx_ops.chaos import checker, presence
from replyx_ops.chaos.clients import ChaosDialogClient, Population, Subscriber
from replyx_ops.chaos.faults import FAULTS, KIND_SPECS
from replyx_ops.chaos.kinds import KINDS, Tenancy
from replyx_ops.chaos.schedule import make_schedule, minimum_each
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


@pytest.mark.parametrize("seed", [7, 15, 2026])
def test_ten_minutes_schedule_every_kind_at_least_five_times(seed: int) -> None:
    assert (minimum_each(60), minimum_each(600)) == (1, 5)
    events = make_schedule(seed, 600, KIND_SPECS)
    counts = {kind: sum(1 for e in events if e.kind == kind) for kind in FAULTS}
    assert min(counts.values()) >= 5, counts


# -- the checker -------------------------------------------------------------------------------


def _row(seq: int) -> checker.Row:
    return checker.Row(100 + seq, "system", checker.digest(f"m{seq}"), f"m{seq}")


def _subscriber(frames: list[list[dict[str, object]]], since: int | None = 0,
                kind: str = "site", dialog_id: int = 7, user_id: int | None = None,
                connected: bool = False) -> Subscriber:
    """A subscriber whose sessions received ``frames`` (connected now, or never)."""
    tenancy = Tenancy(tenant=None, ws_base="ws://", jwt_secret=b"x" * 32)  # type: ignore[arg-type]
    name = "site-1" if kind == "site" else f"{kind}-{dialog_id}-{user_id}"
    sub = Subscriber(name, KINDS[kind], dialog_id, since, tenancy,
                     user_id=user_id)
    for session_frames in frames:
        session = ChaosDialogClient("ws://unused")
        for data in session_frames:
            session.frames.append(Frame(data, time.time()))
        sub.sessions.append(session)
    if connected:
        sub.sessions[-1].connects = 1
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


# -- presence ---------------------------------------------------------------------------------


def _told(sub_kind: str, dialog_id: int, value: object, user_id: int | None = None,
          connected: bool = True) -> Subscriber:
    ready = {"type": "ready", "dialog_id": dialog_id, "last_seq": 0}
    key = "visitor_online" if sub_kind == "admin" else "operators_online"
    return _subscriber([[ready, {"type": "presence", key: value}]], kind=sub_kind,
                       dialog_id=dialog_id, user_id=user_id, connected=connected)


def test_presence_is_checked_against_the_sockets_open_and_ghosts_are_counted() -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    population = Population(None, [7, 8], None)  # type: ignore[arg-type]
    # Operators 1 and 2 have an admin socket open; operator 3's closed. Dialog 7's visitor
    # is on the page; dialog 8's left.
    population.subscribers = [
        _told("admin", 7, True, user_id=1), _told("admin", 8, False, user_id=2),
        _told("admin", 8, True, user_id=3, connected=False),
        _told("widget", 7, 2), _told("widget", 8, 0, connected=False),
    ]
    state = presence.open_state(population, [])
    assert state == presence.OpenState(frozenset({1, 2}), frozenset({7}))
    assert presence.divergences(population, [], state) == []
    # What a gateway that still counts the closed sockets would say: ghosts.
    population.subscribers[0] = _told("admin", 7, True, user_id=1)
    population.subscribers[1] = _told("admin", 8, True, user_id=2)  # the visitor who left
    population.subscribers[3] = _told("widget", 7, 3)  # operator 3, gone
    found = presence.divergences(population, [], state)
    assert [(d["kind"], d["key"], d["expected"], d["told"]) for d in found] == [
        ("ghost", "visitor_online[8]", False, True), ("ghost", "operators_online", 2, 3)]
    # Told less than is open, or nothing after the last ready: missing.
    population.subscribers[3] = _subscriber(
        [[{"type": "presence", "operators_online": 2}, {"type": "ready", "dialog_id": 7}]],
        kind="widget", connected=True)
    assert [d["kind"] for d in presence.divergences(population, [], state)] == [
        "ghost", "missing"]


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
            [str(BIN / "replyx"), "chaos", "--minutes", "1", "--seed", str(SOAK_SEED),
             "--gateways", "2", "--json", "--out", str(out)],
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
    # Two gateways ran behind nginx and were healthy at the end; the gateway faults hit them.
    assert report["gateways"] == 2
    assert {k: v for k, v in report["health_end"].items() if k != "nginx"} == {
        "gateway-1": 200, "gateway-2": 200, "backend": 200}
    assert report["health_end"].get("nginx", 200) == 200
    hit = {e["detail"]["gateway"] for e in report["schedule"]
           if e["kind"].startswith("gateway_sig") and e["outcome"] == "injected"}
    assert hit and hit <= {"gateway-1", "gateway-2"}
    # SSE streams of every kind were checked like sockets.
    by_kind = report["messages_checked_by_kind"]
    assert all(by_kind.get(f"{kind}/sse", 0) > 0 for kind in ("admin", "widget", "site"))
    # Presence equalled the sockets open at the end, as every open socket was told.
    assert report["presence"]["final_checked"] and report["presence"]["observers_checked"] > 10
    assert report["ghost_presence"] == report["missing_presence"] == 0
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".png"]
    assert json.loads(Path(report["files"]["json"]).read_text())["seed"] == SOAK_SEED
    assert "seed 15" in result.stderr  # the schedule is printed before the soak
    assert wall < 150
