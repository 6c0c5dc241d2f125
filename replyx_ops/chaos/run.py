"""``replyx chaos``: the seeded fault soak, its independent checker and its report.

Progress goes to stderr, a summary to stdout (with ``--json``, the report as the
last line), the report to ``<out>/chaos-<date>-seed<S>.{json,png}``. Exit status
0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from replyx.settings import Settings
from replyx_ops.chaos.report import build, save
from replyx_ops.chaos.soak import Plan, Soak
from replyx_ops.chaos.stack import StackError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the soak (default 10; the test suite runs 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the schedule's seed (default: from the clock; always printed)")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway processes behind nginx (REPLYX_GATEWAYS; default 1)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object on the last line of stdout")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the report goes (default $REPLYX_DATA_DIR/chaos/)")
    parser.add_argument("--dialogs", type=int, default=8, help="dialogs under load (8)")
    parser.add_argument("--rate", type=float, default=8.0,
                        help="HTTP posts per second (SQL writes at about a third of it)")
    parser.add_argument("--no-nginx", action="store_true",
                        help="clients go straight to the gateway and the backend")
    parser.add_argument("--schedule-only", action="store_true",
                        help="print the seed's schedule as JSON and exit")


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[chaos {time.monotonic() - self.started:6.1f}s] {message}",
              file=sys.stderr, flush=True)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwind, so that the stack and the database are cleaned up


def summary(r: dict[str, object]) -> str:
    lines = [
        f"{r['command']}: {'OK' if r['ok'] else 'FAILED'}",
        f"  checks        {r['checks']}",
        f"  faults        {r['faults_total']} injected: {r['faults_injected']}",
        f"  messages      {r['rows']} rows, {r['messages_checked']} frames checked",
        f"  lost {r['lost']}  duplicated {r['duplicated']}  reordered {r['reordered']}"
        f"  mismatch {r['mismatch']}  foreign {r['foreign']}  phantom {r['phantom']}",
        f"  stale inbox {r['stale_inbox']}  ghost presence {r['ghost_presence']}"
        f"  missing presence {r['missing_presence']}",
    ]
    if r.get("first_divergence"):
        lines.append(f"  first divergence {json.dumps(r['first_divergence'])}")
    presence = r.get("presence")
    if isinstance(presence, dict) and presence.get("first_divergence"):
        lines.append(f"  first presence divergence {json.dumps(presence['first_divergence'])}")
    return "\n".join(lines)


def main(settings: Settings, args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    if args.minutes <= 0:
        print("replyx chaos: --minutes must be positive", file=sys.stderr)
        return 2
    if args.gateways < 1:
        print("replyx chaos: --gateways must be at least 1", file=sys.stderr)
        return 2
    plan = Plan(seed=seed, soak_seconds=args.minutes * 60, gateways=args.gateways,
                dialogs=args.dialogs, http_rate=args.rate, sql_rate=args.rate / 3,
                nginx=not args.no_nginx)
    if args.schedule_only:
        print(json.dumps([e.as_dict() for e in plan.schedule()]))
        return 0
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    out = args.out or settings.data_dir / "chaos"
    run_dir = settings.data_dir / "chaos" / f"run-{time.strftime('%H%M%S')}-s{seed}"
    progress = Progress()
    started = time.time()
    soak = Soak(settings, plan, run_dir, progress)
    try:
        soak.run()
    except StackError as exc:
        print(f"replyx chaos: {exc}", file=sys.stderr)
        return 1
    result = build(soak, started, args.minutes)
    paths = save(result, out)
    progress(f"done in {time.time() - started:.0f}s")
    print(summary(result))
    for path in paths:
        print(f"written: {path}")
    if args.json:
        print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if result["ok"] else 1
