"""What ``replyx bench`` runs: the workload profiles and the command line that picks one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from replyx_ops.bench.servers import ROOT

RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Workload:
    dialogs: int = 1500
    rate: float = 200.0
    duration: float = 60.0
    warmup: float = 5.0
    busy_sockets: int = 1000
    burst: int = 100
    burst_per_dialog: int = 20
    idle_sockets: int = 10_000
    #: Seconds for a server's RSS to settle before and after its idle sockets open.
    memory_settle: float = 2.0
    commit_clients: int = 8
    commit_seconds: float = 10.0
    load_workers: int = 2
    peer: bool = True


PROFILES = {
    "full": Workload(),
    "quick": Workload(dialogs=1000, duration=20.0, warmup=3.0, burst=50, burst_per_dialog=10,
                      commit_seconds=5.0),
    "tiny": Workload(dialogs=20, rate=20.0, duration=1.0, warmup=0.5, busy_sockets=20, burst=5,
                     burst_per_dialog=2, idle_sockets=100, commit_clients=2, commit_seconds=1.0,
                     memory_settle=0.5),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="profile", const="quick",
                      help="a smaller run that finishes in under 5 minutes")
    size.add_argument("--tiny", action="store_const", dest="profile", const="tiny",
                      help="a seconds-long smoke run (the test suite's)")
    parser.set_defaults(profile="full")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on the last line of stdout")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help=f"where <date>.json and <date>.png go (default {RESULTS})")
    parser.add_argument("--no-peer", action="store_true", help="skip the Starlette peer")
    parser.add_argument("--keep-database", action="store_true",
                        help="leave the replyx_bench_<hex> database in place afterwards")
    parser.add_argument("--profile-gateway", type=Path, metavar="DIR", default=None,
                        help="record the servers with py-spy during fan-out"
                        " (collapsed stacks, for speedscope or flamegraph.pl)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="instead of the phases: ReplyX over WebSockets, over SSE and the peer"
                        " interleaved, N rounds at each of --rates (latency and many-dialogs"
                        " fan-out)")
    parser.add_argument("--rates", default="200,1000",
                        help="msg/s of the rounds, comma-separated (default 200,1000)")
    for name, kind in (
        ("dialogs", int), ("rate", float), ("duration", float), ("busy-sockets", int),
        ("burst", int), ("burst-per-dialog", int), ("idle-sockets", int),
        ("commit-clients", int), ("load-workers", int),
    ):
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=f"override the profile's {name.replace('-', ' ')}")


def workload_from(args: argparse.Namespace) -> Workload:
    work = PROFILES[args.profile]
    overrides = {
        field: getattr(args, field)
        for field in ("dialogs", "rate", "duration", "busy_sockets", "burst",
                      "burst_per_dialog", "idle_sockets", "commit_clients", "load_workers")
        if getattr(args, field, None) is not None
    }
    if args.no_peer:
        overrides["peer"] = False
    return replace(work, **overrides)
