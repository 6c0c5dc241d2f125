"""``replyx bench --rounds N``: the product and the peer interleaved, round after round.

One run on a noisy machine says little: a tail depends on what else ran in
those seconds. So both stacks are started once and measured in turns — ReplyX
over WebSockets, ReplyX over server-sent events, peer, and again … — ``N``
rounds at each rate of ``--rates``. Each turn opens two sockets (or event
streams) on each of ``--dialogs`` dialogs, POSTs for ``--duration`` seconds
after a warm-up (the latency phase of :mod:`replyx_ops.bench.run`), then commits
one many-dialogs burst (``--burst-per-dialog`` messages on every dialog) and
measures its fan-out. ReplyX's turns also read its per-stage timing.

The report gives, per rate and stack, every round's p50/p99 and the median of
those with their spread (min-max), frames lost, and the many-dialogs fan-out of
every round with the ReplyX/peer ratio and the SSE/WebSocket ratios per round.
Invariant: every stack and transport sees the same database, dialogs, rate and
socket count in every round, and only one of them is ever under load (the
peer's turns disable ReplyX's NOTIFY trigger); the two transports of ReplyX run
back to back on the same gateway, so their comparison is not one of two moments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from replyx.settings import Settings
from replyx_ops.bench.load import Process, SocketPool, poster_main
from replyx_ops.bench.measure import Progress, free_port, machine_info, result_paths
from replyx_ops.bench.phases import Phases
from replyx_ops.bench.profiles import workload_from
from replyx_ops.bench.servers import (
    BenchDatabase,
    Server,
    Tenant,
    notify_triggers,
    start_backend,
    start_gateway,
    start_peer,
)
from replyx_ops.bench.sseclient import as_sse
from replyx_ops.bench.stages import StageProbe, describe

#: The turns of a round, in order: ReplyX's two transports, then the peer.
STACKS = ("replyx", "replyx_sse", "peer")
#: SSE against WebSocket (issue 13): p99 at most 20 % above, fan-out at least 80 %.
SSE_P99_RATIO_MAX = 1.2
SSE_FANOUT_RATIO_MIN = 0.8
Spec = tuple[int, str, str | None]


class Rounds(Phases):
    def run_rounds(self, rounds: int, rates: Sequence[float]) -> dict[str, Any]:
        work, say = self.work, self.progress
        self.db = BenchDatabase(self.settings.database_url, self.settings.data_dir)
        tenant = Tenant(self.db, self.jwt_secret.encode())
        dialogs = tenant.add_dialogs(work.dialogs)
        say(f"database {self.db.name} (Postgres {self.db.version()}): {len(dialogs)} dialogs;"
            f" {rounds} rounds at {', '.join(f'{r:g}' for r in rates)} msg/s")
        log_dir = self.run_dir / "log"
        backend_port, gateway_port, peer_port = free_port(), free_port(), free_port()
        self.start(start_backend, self.env(), backend_port, log_dir)
        gateway = self.start(start_gateway, self.env(), gateway_port, log_dir)
        peer = self.start(start_peer, self.env(), peer_port, log_dir)
        time.sleep(2.0)  # all four peer workers through their lifespan start-up
        self.pool = SocketPool(work.load_workers, "127.0.0.1", gateway_port)
        self.poster = Process(poster_main)
        probe = StageProbe(f"http://127.0.0.1:{backend_port}/metrics",
                           f"http://127.0.0.1:{gateway_port}/metrics")
        pairs = [spec for d in dialogs for spec in tenant.pair(d)]
        turns: dict[str, tuple[Server, int, int, list[Spec], StageProbe | None]] = {
            "replyx": (gateway, gateway_port, backend_port, pairs, probe),
            "replyx_sse": (gateway, gateway_port, backend_port, as_sse(pairs), probe),
            "peer": (peer, peer_port, peer_port,
                     [(d, f"/ws/dialogs/{d}?site_token={tenant.site_token}", None)
                      for d in dialogs for _ in range(2)], None),
        }
        load_before = os.getloadavg()
        by_rate: dict[str, Any] = {}
        for rate in rates:
            self.work = replace(work, rate=rate)
            results: dict[str, list[dict[str, Any]]] = {stack: [] for stack in STACKS}
            for index in range(1, rounds + 1):
                for stack in STACKS:
                    server, ws_port, api_port, specs, stage_probe = turns[stack]
                    say(f"round {index}/{rounds} at {rate:g} msg/s: {stack}")
                    results[stack].append(self.turn(tenant, dialogs, stack, server, ws_port,
                                                    api_port, specs, stage_probe))
            by_rate[f"{rate:g}"] = summarise_rate(results)
        self.work = work
        return {
            "date": time.strftime("%Y-%m-%d"),
            "rounds": rounds,
            "rates": by_rate,
            "machine": machine_info(self.db.version(), load_before, os.getloadavg()),
            "workload": {"dialogs": work.dialogs, "sockets": 2 * work.dialogs,
                         "duration": work.duration, "warmup": work.warmup,
                         "burst_per_dialog": work.burst_per_dialog},
        }

    def turn(self, tenant: Tenant, dialogs: list[int], stack: str, server: Server,
             ws_port: int, api_port: int, specs: list[Spec], probe: StageProbe | None
             ) -> dict[str, Any]:
        """One stack's latency phase, then its many-dialogs burst (with ``server``'s CPU)."""
        assert self.pool is not None and self.db is not None
        with self.db.connect() as conn:
            # The peer publishes itself: ReplyX's trigger would NOTIFY a second time for nothing.
            conn.execute(notify_triggers("DISABLE" if stack == "peer" else "ENABLE"))
        self.pool.target("127.0.0.1", ws_port)
        result = self.latency_phase(tenant, dialogs, specs, api_port, probe)
        result["many_dialogs"] = self.burst_case(
            tenant, "many_dialogs", dialogs, self.work.burst_per_dialog, ["latency"], len(specs),
            "dialog_" if stack == "peer" else None, server)
        self.pool.close("latency")
        return result


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def summarise_rate(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per stack: each round's figures, the medians and spreads; the per-round fan-out ratio."""
    summary: dict[str, Any] = {}
    for stack, turns in results.items():
        summary[stack] = {
            "p50_ms": _spread([t["latency_ms"]["p50"] for t in turns]),
            "p99_ms": _spread([t["latency_ms"]["p99"] for t in turns]),
            "many_dialogs_frames_per_s": _spread(
                [t["many_dialogs"]["frames_per_s"] for t in turns]),
            "lost": sum(t["lost"] + t["many_dialogs"]["lost"] for t in turns),
            "rounds": [
                {"p50_ms": t["latency_ms"]["p50"], "p99_ms": t["latency_ms"]["p99"],
                 "http_ms": t["http_ms"], "rate_msgs_per_s": t["rate_msgs_per_s"],
                 "server_cpu_per_s": t["server_cpu_per_s"], "lost": t["lost"],
                 "many_dialogs": t["many_dialogs"], **({"stages": t["stages"]}
                                                       if "stages" in t else {})}
                for t in turns
            ],
        }
    ours, sse, peer = results["replyx"], results["replyx_sse"], results["peer"]
    summary["fanout_ratio_per_round"] = _ratios(ours, peer, _fanout)
    # The same bursts per CPU-second of each server: what the rest of the machine did meanwhile
    # does not enter (the peer's four workers may use both cores, the gateway one).
    summary["fanout_per_cpu_ratio_per_round"] = _ratios(ours, peer, _fanout_per_cpu)
    summary["sse_p99_ratio_per_round"] = _ratios(sse, ours, _p99)
    summary["sse_fanout_ratio_per_round"] = _ratios(sse, ours, _fanout)
    summary["stages"] = _median_stages([t.get("stages") or {} for t in ours])
    summary["targets"] = {
        "p50_at_or_below_peer": _le(summary["replyx"]["p50_ms"], summary["peer"]["p50_ms"]),
        "p99_at_or_below_peer": _le(summary["replyx"]["p99_ms"], summary["peer"]["p99_ms"]),
        "fanout_1_5x_peer_every_round": all(r >= 1.5 for r in summary["fanout_ratio_per_round"]),
        "lost_zero": summary["replyx"]["lost"] == 0 and summary["replyx_sse"]["lost"] == 0,
        "sse_p99_within_20pct_of_ws": _ratio_of_medians(
            summary["replyx_sse"]["p99_ms"], summary["replyx"]["p99_ms"]) <= SSE_P99_RATIO_MAX,
        "sse_fanout_within_20pct_of_ws": _ratio_of_medians(
            summary["replyx_sse"]["many_dialogs_frames_per_s"],
            summary["replyx"]["many_dialogs_frames_per_s"]) >= SSE_FANOUT_RATIO_MIN,
    }
    return summary


def _p99(turn: dict[str, Any]) -> float:
    return float(turn["latency_ms"]["p99"])


def _fanout(turn: dict[str, Any]) -> float:
    return float(turn["many_dialogs"]["frames_per_s"])


def _fanout_per_cpu(turn: dict[str, Any]) -> float:
    return float(turn["many_dialogs"].get("frames_per_cpu_s") or 0.0)


def _ratios(a: list[dict[str, Any]], b: list[dict[str, Any]],
            figure: Callable[[dict[str, Any]], float]) -> list[float]:
    """``figure`` of ``a`` over that of ``b``, round by round."""
    return [round(figure(x) / max(figure(y), 1e-9), 2) for x, y in zip(a, b, strict=True)]


def _ratio_of_medians(a: dict[str, float | None], b: dict[str, float | None]) -> float:
    if a["median"] is None or not b["median"]:
        return float("nan")
    return a["median"] / b["median"]


def _le(ours: dict[str, float | None], peer: dict[str, float | None]) -> bool:
    a, b = ours["median"], peer["median"]
    return a is not None and b is not None and a <= b


def _median_stages(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each stage's median p50 and p99 over the rounds."""
    names = [name for name in rounds[0]] if rounds else []
    merged: dict[str, dict[str, Any]] = {}
    for name in names:
        p50s = [r[name]["p50_ms"] for r in rounds if r.get(name, {}).get("p50_ms") is not None]
        p99s = [r[name]["p99_ms"] for r in rounds if r.get(name, {}).get("p99_ms") is not None]
        merged[name] = {"p50_ms": round(statistics.median(p50s), 3) if p50s else None,
                        "p99_ms": round(statistics.median(p99s), 3) if p99s else None}
    return merged


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['rounds']} interleaved rounds, {result['workload']['sockets']} sockets"]
    for rate, summary in result["rates"].items():
        lines.append("")
        lines.append(f"{rate + ' msg/s':20} {'replyx WS':26} {'replyx SSE':26} peer"
                     "   (median, min-max)")
        for key, label in (("p50_ms", "latency p50 ms"), ("p99_ms", "latency p99 ms"),
                           ("many_dialogs_frames_per_s", "many dialogs fr/s")):
            cells = [_cell(summary[stack][key]) for stack in STACKS]
            lines.append(f"  {label:18} {cells[0]:26} {cells[1]:26} {cells[2]}")
        lost = [str(summary[stack]["lost"]) for stack in STACKS]
        lines.append(f"  {'lost':18} {lost[0]:26} {lost[1]:26} {lost[2]}")
        for key, label in (("fanout_ratio_per_round", "fan-out WS/peer"),
                           ("fanout_per_cpu_ratio_per_round", "fan-out per CPU-s WS/peer"),
                           ("sse_p99_ratio_per_round", "p99 SSE/WS"),
                           ("sse_fanout_ratio_per_round", "fan-out SSE/WS")):
            lines.append(f"  {label} per round: "
                         + ", ".join(f"{r:.2f}x" for r in summary[key]))
        lines.append(f"  stages (median p50/p99 ms): {describe(summary['stages'])}")
        missed = [name for name, ok in summary["targets"].items() if not ok]
        lines.append("  targets missed: " + (", ".join(missed) if missed else "none"))
    return "\n".join(lines)


def _cell(spread: dict[str, float | None]) -> str:
    return f"{spread['median']} ({spread['min']}-{spread['max']})"


def save(result: dict[str, Any], output: Path) -> Path:
    (path,) = result_paths(output, f"rounds-{result['date']}")
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def main(settings: Settings, args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    progress = Progress()
    rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    bench = Rounds(settings, workload_from(args), progress, None, args.keep_database)
    with bench.running():
        result = bench.run_rounds(args.rounds, rates)
    progress(f"done in {time.monotonic() - progress.started:.0f}s")
    print(table(result))
    print(f"written: {save(result, args.output)}")
    if args.json:
        print(json.dumps(result, separators=(",", ":")), flush=True)
    lost = sum(summary[stack]["lost"] for summary in result["rates"].values() for stack in STACKS)
    return 0 if lost == 0 else 1


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwind through Phases.running() to stop the servers
