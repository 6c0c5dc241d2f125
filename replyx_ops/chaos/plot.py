"""The soak's PNG timeline, drawn from its JSON report: faults against notification lag,
connected sockets and gateway memory. ``python -m replyx_ops.chaos.plot REPORT.json OUT.png``
(``replyx chaos`` runs it; it can redraw any saved report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# A Figure of its own (not pyplot) draws with Agg whatever the environment's backend.
from matplotlib.figure import Figure

NAN = float("nan")


def _num(value: Any) -> float:
    return float(value) if value is not None else NAN


def plot(report: dict[str, Any], path: Path) -> None:
    rows = [dict(zip(report["timeline_fields"], row, strict=True)) for row in report["timeline"]]
    fig = Figure(figsize=(12, 9))
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1.3, 1.3, 1]})
    schedule = report["schedule"]
    kinds = sorted({e["kind"] for e in schedule})
    ax = axes[0]
    for e in schedule:
        if e["started"] is None:
            continue
        width = max(0.4, (e["ended"] or e["started"]) - e["started"])
        color = {"injected": "tab:red", "skipped": "tab:gray"}.get(e["outcome"], "black")
        y = kinds.index(e["kind"])
        ax.broken_barh([(e["started"], width)], (y - 0.35, 0.7), color=color, alpha=0.8)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.axvline(report["soak_s"], color="k", ls=":", lw=1)
    ax.set_title(f"{report['command']}: lost {report['lost']}, duplicated"
                 f" {report['duplicated']}, reordered {report['reordered']},"
                 f" {'OK' if report['ok'] else 'FAILED'}", fontsize=10)
    t = [r["t"] for r in rows]
    axes[1].plot(t, [_num(r["lag_ms"]) for r in rows], ".-", ms=2, lw=0.8, color="tab:blue")
    for r in rows:
        if r["status"] != 200:
            axes[1].axvspan(r["t"] - 0.25, r["t"] + 0.25, color="tab:orange", alpha=0.25, lw=0)
    axes[1].set_ylabel("notification\nlag ms")
    axes[1].set_yscale("symlog", linthresh=10)
    axes[2].plot(t, [r["connected"] for r in rows], lw=1, label="our connected sockets")
    axes[2].plot(t, [_num(r["gateway_sockets"]) for r in rows], lw=1,
                 label="gateway /health sockets")
    axes[2].set_ylabel("sockets")
    axes[2].legend(fontsize=7, loc="upper right")
    axes[3].plot(t, [_num(r["rss_mb"]) for r in rows], lw=1, color="tab:green")
    axes[3].set_ylabel("gateways'\nRSS MiB")
    axes[3].set_xlabel("seconds since the soak started (orange: gateway /health not 200)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m replyx_ops.chaos.plot REPORT.json OUT.png", file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
