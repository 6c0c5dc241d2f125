"""``replyx bench`` results: checked against the targets, as a table, a JSON file, a PNG plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from replyx_ops.bench.measure import result_paths

# The targets, each as (name, how to check it on a result).
P99_TARGET_MS = 25.0
FANOUT_VS_NAIVE = 3.0
RSS_TARGET_KB = 30.0
#: SSE next to WebSocket in the same run: fan-out at least 80 %, p99 at most 120 %.
SSE_WITHIN = 0.20


def targets(r: dict[str, Any]) -> dict[str, bool | None]:
    peer = r.get("peer")
    p99 = r["latency_ms"]["p99"]
    checks: dict[str, bool | None] = {
        "fanout_3x_naive": r["fanout_frames_per_s"] >= FANOUT_VS_NAIVE
        * r["naive_fanout_frames_per_s"],
        "p99_under_25ms": p99 is not None and p99 < P99_TARGET_MS,
        "routing_keeps_up": r["notify_route_per_s"] >= r["pg_commit_per_s"]
        and r["detail"]["replyx"]["routing"]["keeps_up"],
        "rss_under_30kb": r["rss_kb_per_socket"] < RSS_TARGET_KB,
        "lost_zero": r["lost"] == 0,
        "ahead_of_peer_p99": None,
        "ahead_of_peer_fanout": None,
    }
    if peer is not None:
        peer_p99 = peer["latency_ms"]["p99"]
        checks["ahead_of_peer_p99"] = p99 is not None and peer_p99 is not None and p99 < peer_p99
        checks["ahead_of_peer_fanout"] = r["fanout_frames_per_s"] > peer["fanout_frames_per_s"]
    return checks


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return text + unit


def table(r: dict[str, Any]) -> str:
    peer = r.get("peer") or {}
    lat = r["latency_ms"]
    plat = peer.get("latency_ms") or {}
    rows = [
        ("metric", "replyx", "naive loop", "peer", "target"),
        ("sockets (latency)", _fmt(r["sockets"]), "", _fmt(peer.get("sockets")), "2,000+"),
        ("rate msgs/s", _fmt(r["rate_msgs_per_s"]), "", _fmt(peer.get("rate_msgs_per_s")), "200"),
    ]
    for key in ("p50", "p90", "p99", "max"):
        rows.append((f"latency {key} ms", _fmt(lat[key]), "", _fmt(plat.get(key)),
                     "< 25" if key == "p99" else ""))
    rows += [
        ("lost", _fmt(r["lost"]), "", _fmt(peer.get("lost")), "0"),
        ("fan-out frames/s", _fmt(r["fanout_frames_per_s"]),
         _fmt(r["naive_fanout_frames_per_s"]), _fmt(peer.get("fanout_frames_per_s")),
         "≥ 3x naive, > peer"),
        ("routed notifications/s", _fmt(r["notify_route_per_s"]), "",
         _fmt(peer.get("notify_route_per_s")), f"≥ {_fmt(r['pg_commit_per_s'])} (commits/s)"),
        ("Postgres commits/s", _fmt(r["pg_commit_per_s"]), "", "", ""),
        (f"RSS kB per idle socket ({_fmt(r['idle_sockets'])})", _fmt(r["rss_kb_per_socket"]),
         "", _fmt(peer.get("rss_kb_per_socket")), "< 30"),
    ]
    sse = r.get("sse")
    if sse is not None:
        rows += [
            ("SSE latency p50 / p99 ms", f"{_fmt(sse['latency_ms']['p50'])} /"
             f" {_fmt(sse['latency_ms']['p99'])}", "", "", f"p99 ≤ {_fmt(sse['p99_limit_ms'])}"
             " (WS +20 %)"),
            ("SSE fan-out frames/s", _fmt(sse["fanout_frames_per_s"]), "", "",
             f"≥ {_fmt(sse['fanout_floor'])} (WS -20 %)"),
            ("SSE lost, duplicates, gaps",
             f"{sse['lost']}, {sse['duplicates']}, {sse['gaps']}", "", "", "0"),
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    missed = [name for name, ok in r["targets"].items() if ok is False]
    lines.append("")
    lines.append("targets missed: " + (", ".join(missed) if missed else "none"))
    return "\n".join(lines)


def save(r: dict[str, Any], output: Path) -> list[Path]:
    json_path, png_path = result_paths(output, r["date"], (".json", ".png"))
    json_path.write_text(json.dumps(r, indent=2) + "\n")
    paths = [json_path]
    png = plot(r, png_path)
    if png is not None:
        paths.append(png)
    return paths


def plot(r: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles (replyx vs peer) and fan-out rates (replyx, naive, peer)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peer = r.get("peer")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = ["p50", "p90", "p99", "max"]
    series = [("replyx", r["latency_ms"], "#2f6db5")]
    if peer:
        series.append(("peer (Starlette + broadcaster)", peer["latency_ms"], "#c8553d"))
    width = 0.8 / len(series)
    for i, (label, values, color) in enumerate(series):
        xs = [k + i * width for k in range(len(keys))]
        heights = [values[k] or 0 for k in keys]
        bars = left.bar(xs, heights, width, label=label, color=color)
        left.bar_label(bars, fmt="%.1f", fontsize=7)
    left.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(keys))], keys)
    left.set_yscale("log")
    left.set_ylabel("ms, POST start → frame at the socket")
    left.axhline(P99_TARGET_MS, color="grey", linestyle="--", linewidth=0.8)
    left.set_title(f"End-to-end latency, {r['sockets']:,} sockets,"
                   f" {r['rate_msgs_per_s']:.0f} msg/s", fontsize=10)
    left.legend(fontsize=8)

    names = ["replyx", "naive loop"]
    cases = [r["detail"]["replyx"]["fanout"], r["detail"]["naive"]]
    colors = ["#2f6db5", "#8a9bb0"]
    if peer:
        names.append("peer")
        cases.append(r["detail"]["peer"]["fanout"])
        colors.append("#c8553d")
    groups = ["one_dialog", "many_dialogs"]
    width = 0.8 / len(names)
    for i, (label, case, color) in enumerate(zip(names, cases, colors, strict=True)):
        xs = [g + i * width for g in range(len(groups))]
        bars = right.bar(xs, [case[g]["frames_per_s"] for g in groups], width,
                         label=label, color=color)
        right.bar_label(bars, labels=[f"{case[g]['frames_per_s']:,}" for g in groups],
                        fontsize=7)
    right.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))],
                     ["one busy dialog", "many dialogs"])
    right.set_ylabel("frames written per second")
    right.set_title("Fan-out", fontsize=10)
    right.legend(fontsize=8)
    machine = r.get("machine", {})
    fig.suptitle(f"replyx bench {r['date']} — {machine.get('cores', '?')} cores,"
                 f" {machine.get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarise(ours: dict[str, Any], naive_fan: dict[str, Any],
              peer: dict[str, Any] | None) -> dict[str, Any]:
    """The result of a run: the headline numbers, each phase's detail, the targets."""
    lat, fan = ours["latency"], ours["fanout"]
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "latency_ms": lat["latency_ms"],
        "sockets": lat["sockets"],
        "rate_msgs_per_s": lat["rate_msgs_per_s"],
        "lost": lat["lost"] + fan["lost"] + ours["routing"]["lost"] + naive_fan["lost"],
        "fanout_frames_per_s": fan["frames_per_s"],
        "naive_fanout_frames_per_s": naive_fan["frames_per_s"],
        "notify_route_per_s": fan["many_dialogs"]["notifications_per_s"],
        "pg_commit_per_s": ours["routing"]["pg_commit_per_s"],
        "rss_kb_per_socket": ours["memory"]["rss_kb_per_socket"],
        "idle_sockets": ours["memory"]["sockets"],
        "peer": None,
        "detail": {"replyx": ours, "naive": naive_fan},
    }
    if peer is not None:
        result["peer"] = {
            "latency_ms": peer["latency"]["latency_ms"],
            "sockets": peer["latency"]["sockets"],
            "rate_msgs_per_s": peer["latency"]["rate_msgs_per_s"],
            "lost": peer["latency"]["lost"] + peer["fanout"]["lost"],
            "fanout_frames_per_s": peer["fanout"]["frames_per_s"],
            "notify_route_per_s": peer["fanout"]["many_dialogs"]["notifications_per_s"],
            "rss_kb_per_socket": peer["memory"]["rss_kb_per_socket"],
            "idle_sockets": peer["memory"]["sockets"],
        }
        result["detail"]["peer"] = peer
    result["targets"] = targets(result)
    if "sse" in ours:
        result["sse"] = sse_block(ours["sse"], result)
        result["lost"] += result["sse"]["lost"]
        result["targets"]["sse_lost_zero"] = result["sse"]["lost"] == 0
        result["targets"].update(result["sse"]["targets"])
    return result


def sse_block(sse: dict[str, Any], ws: dict[str, Any]) -> dict[str, Any]:
    """The SSE phases' headline numbers, each next to the WebSocket one of the same run."""
    lat, fan = sse["latency"], sse["fanout"]
    ws_p99, p99 = ws["latency_ms"]["p99"], lat["latency_ms"]["p99"]
    limit = round(ws_p99 * (1 + SSE_WITHIN), 2) if ws_p99 is not None else None
    floor = round(ws["fanout_frames_per_s"] * (1 - SSE_WITHIN))
    return {
        "latency_ms": lat["latency_ms"],
        "sockets": lat["sockets"],
        "rate_msgs_per_s": lat["rate_msgs_per_s"],
        "lost": lat["lost"] + fan["lost"],
        "duplicates": lat["duplicates"],
        "gaps": lat["gaps"],
        "fanout_frames_per_s": fan["frames_per_s"],
        "fanout_one_dialog_frames_per_s": fan["one_dialog"]["frames_per_s"],
        "fanout_many_dialogs_frames_per_s": fan["many_dialogs"]["frames_per_s"],
        "p99_vs_ws": round(p99 / ws_p99, 2) if p99 is not None and ws_p99 else None,
        "fanout_vs_ws": round(fan["frames_per_s"] / max(ws["fanout_frames_per_s"], 1), 2),
        "p99_limit_ms": limit,
        "fanout_floor": floor,
        "targets": {
            "sse_p99_within_20pct": p99 is not None and limit is not None and p99 <= limit,
            "sse_fanout_within_20pct": fan["frames_per_s"] >= floor,
        },
    }
