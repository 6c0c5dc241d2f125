"""The soak's report: one JSON object (file and, with ``--json``, the last stdout line) and a
PNG timeline of faults against notification lag, sockets and gateway memory.

``ok`` is true only when every check passed: delivery, writes, every gateway's
``/health`` at the end, memory, faults (none failed, every kind injected at least
:func:`~replyx_ops.chaos.schedule.minimum_each` times), inbox views and presence.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replyx_ops.chaos.checker import COUNTS
from replyx_ops.chaos.faults import FAULTS
from replyx_ops.chaos.schedule import minimum_each

if TYPE_CHECKING:
    from replyx_ops.chaos.monitor import Sample
    from replyx_ops.chaos.soak import Soak

#: A gateway whose RSS grows faster than this over a stretch of at least RSS_MIN_SPAN fails.
RSS_SLOPE_LIMIT_MB_PER_MIN = 20.0
RSS_MIN_SPAN_S = 120.0
RSS_LIMIT_MB = 1024.0


def rss_summary(samples: list[Sample]) -> dict[str, Any]:
    """RSS by gateway process (pids change at each restart); the slope of the longest life."""
    lives: dict[int, list[tuple[float, float]]] = {}
    for s in samples:
        for pid, rss in s.gateways.values():
            if rss is not None:
                lives.setdefault(pid, []).append((s.t, rss / 2**20))
    if not lives:
        return {"processes": 0, "ok": False}
    longest = max(lives.values(), key=lambda pts: pts[-1][0] - pts[0][0])
    span = longest[-1][0] - longest[0][0]
    slope = None
    if len(longest) >= 3 and span > 0:
        slope = statistics.linear_regression([t for t, _ in longest],
                                             [m for _, m in longest]).slope * 60
    peak = max(m for pts in lives.values() for _, m in pts)
    grows = slope is not None and span >= RSS_MIN_SPAN_S and slope > RSS_SLOPE_LIMIT_MB_PER_MIN
    return {
        "processes": len(lives),
        "slope_mb_per_min": round(slope, 3) if slope is not None else None,
        "slope_span_s": round(span, 1),
        "slope_judged": span >= RSS_MIN_SPAN_S,
        "mb_start": round(longest[0][1], 1), "mb_end": round(longest[-1][1], 1),
        "mb_max": round(peak, 1),
        "ok": not grows and peak < RSS_LIMIT_MB,
    }


def build(soak: Soak, started: float, minutes: float) -> dict[str, Any]:
    plan = soak.plan
    verdict = soak.final_verdict
    by_kind: dict[str, Counter[str]] = {}
    for event in soak.schedule:
        by_kind.setdefault(event.kind, Counter())["scheduled"] += 1
    for done in soak.injected:
        by_kind[done.event.kind][done.outcome] += 1
    faults = {kind: {k: c.get(k, 0) for k in ("scheduled", "injected", "skipped", "error")}
              for kind, c in sorted(by_kind.items())}
    least = minimum_each(plan.soak_seconds)
    short = {kind: faults.get(kind, {}).get("injected", 0) for kind in FAULTS
             if faults.get(kind, {}).get("injected", 0) < least}
    injected = {k: v["injected"] for k, v in faults.items()}
    t0 = soak.t0
    outcomes = {r.event.index: r for r in soak.injected}
    schedule = []
    for event in soak.schedule:
        record = outcomes.get(event.index)
        schedule.append({
            **event.as_dict(),
            "outcome": record.outcome if record else "not run",
            "started": round(record.started - t0, 2) if record else None,
            "ended": round(record.ended - t0, 2) if record and record.ended else None,
            "detail": {k: v for k, v in (record.detail if record else {}).items()
                       if k != "trace"},
        })
    counts = verdict.counts if verdict else dict.fromkeys(COUNTS, 0)
    first = verdict.first() if verdict else None
    repro = (f"replyx chaos --minutes {minutes:g} --seed {plan.seed}"
             + (f" --gateways {plan.gateways}" if plan.gateways != 1 else ""))

    def context(at: float, before: float = 10.0) -> dict[str, Any]:
        """The faults around ``at`` (seconds since the soak started), and how to replay."""
        return {
            "seed": plan.seed,
            "faults_active": [e["kind"] + f"#{e['index']}" for e in schedule
                              if e["started"] is not None and e["started"] <= at
                              <= (e["ended"] or e["started"]) + 0.5],
            "faults_before": [f"{e['kind']}#{e['index']}@{e['started']}" for e in schedule
                              if e["started"] is not None and at - before <= e["started"] <= at],
            "repro": repro,
        }

    first_dict = None
    if first is not None:
        first_dict = {**first.as_dict(t0), **context(first.at - t0)}
    subs = soak.population.subscribers
    codes = Counter(str(c) for s in subs for c in s.close_codes())
    lags = [s.lag_ms for s in soak.samples if s.lag_ms is not None]
    rss = rss_summary(soak.samples)
    health_end = soak.result.get("health_end", {})
    presence: dict[str, Any] = soak.presence.summary() if soak.presence is not None else {
        "ghost_presence": 0, "missing_presence": 0, "final_checked": False}
    if presence.get("first_divergence"):
        # A ghost is a socket counted after it closed: the faults of the last 30 s made it.
        found = presence["first_divergence"]
        presence["first_divergence"] = {**found, **context(found["t"], 30.0)}
    writes_check = soak.result.get("writes_check", {})
    checks = {
        "delivery": bool(verdict and verdict.ok),
        "writes": bool(writes_check) and writes_check.get("acked_missing") == 0
        and writes_check.get("rolled_back_committed") == 0,
        "health_end": bool(health_end) and all(v == 200 for v in health_end.values()),
        "rss": bool(rss.get("ok")),
        "faults": not any(v["error"] for v in faults.values()) and not short,
        "inbox": not (soak.result.get("inbox") or {}).get("stale_entries")
        and not (soak.result.get("inbox") or {}).get("gave_up"),
        "presence": presence["final_checked"] and not presence["ghost_presence"]
        and not presence["missing_presence"],
    }
    return {
        "command": repro,
        "seed": plan.seed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "soak_s": plan.soak_seconds,
        "wall_s": round(time.time() - started, 1),
        "gateways": plan.gateways,
        "ok": all(checks.values()),
        "checks": checks,
        **{name: counts[name] for name in COUNTS},
        "not_caught_up": verdict.not_caught_up if verdict else [],
        "gave_up": verdict.gave_up if verdict else {},
        "first_divergence": first_dict,
        "stale_inbox": (soak.result.get("inbox") or {}).get("stale_entries", 0),
        "ghost_presence": presence["ghost_presence"],
        "missing_presence": presence["missing_presence"],
        "presence": presence,
        "inbox": soak.result.get("inbox"),
        "checkpoint_divergence": soak.result.get("checkpoint_divergence"),
        "messages_checked": verdict.messages_checked if verdict else 0,
        "messages_checked_by_kind": dict(sorted(verdict.by_kind.items())) if verdict else {},
        "rows": soak.result.get("rows"),
        "writes": {**soak.writes.summary(), **writes_check},
        "faults_injected": injected,
        "faults_total": sum(injected.values()),
        "faults_minimum_each": least,
        "faults_short": short,
        "faults": faults,
        "sockets": {
            "subscribers": len(subs),
            "steady": len(soak.population.steady()),
            "burst": len(subs) - len(soak.population.steady()),
            "sessions": sum(len(s.sessions) for s in subs),
            "connects": sum(x.connects for s in subs for x in s.sessions),
            "by_kind": dict(sorted(Counter(s.label for s in subs).items())),
            "token_renewals": sum(s.renewals for s in subs),
            "close_codes": dict(sorted(codes.items())),
        },
        "gateway": {
            "rss": rss,
            "restarts": max(0, rss.get("processes", plan.gateways) - plan.gateways),
            "lag_ms_max": round(max(lags), 1) if lags else None,
            "lag_ms_median": round(statistics.median(lags), 1) if lags else None,
            "unhealthy_s": round(0.5 * sum(1 for s in soak.samples if s.status != 200), 1),
        },
        "health_end": health_end,
        "last_words": soak.result.get("last_words"),
        "proxy": {"accepted": dict(soak.stack.proxy.accepted), "cut": soak.stack.proxy.cuts},
        "checkpoints": soak.checkpoints,
        "stack": {"nginx": soak.stack.nginx, "database": "embedded" if soak.db.can_crash
                  else "DATABASE_URL", "settings": plan.stack_env,
                  "run_dir": str(soak.run_dir)},
        "schedule": schedule,
        # Every half second: t, gateway /health status (200 when every gateway's is), the
        # worst notification lag (ms), the gateways' socket count, our connected sockets,
        # the gateways' RSS together (MiB).
        "timeline_fields": ["t", "status", "lag_ms", "gateway_sockets", "connected", "rss_mb"],
        "timeline": [
            [round(x.t, 2), x.status, x.lag_ms, x.gateway_sockets, x.connected,
             round(x.rss / 2**20, 1) if x.rss else None] for x in soak.samples
        ],
    }


def save(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"chaos-{time.strftime('%Y%m%d-%H%M%S')}-seed{report['seed']}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    report["files"] = {"json": str(json_path), "png": str(png_path)}
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    # matplotlib takes seconds to import: the plot runs in a process of its own rather than
    # slowing every `replyx` command down (python -m replyx_ops.chaos.plot REPORT.json PNG).
    done = subprocess.run([sys.executable, "-m", "replyx_ops.chaos.plot", str(json_path),
                           str(png_path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"replyx chaos: the plot failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return [json_path]
    return [json_path, png_path]
