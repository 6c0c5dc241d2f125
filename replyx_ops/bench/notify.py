"""The NOTIFY ceiling: how far one Postgres carries the events, with more listeners and gateways.

Two phases, on a database of its own (:class:`~replyx_ops.bench.servers.BenchDatabase`):

1. **commits** — message INSERTs (one row, one commit, the trigger's NOTIFYs) from
   ``--writers`` connections for ``--seconds``, with 1, 2, 8, 32 and 128 plain asyncpg
   sessions LISTENing on ``replyx_events`` and draining every notification. Each commit
   that sent a NOTIFY takes one global lock on the notification queue at COMMIT, and each
   listener must read every notification: commits/s falls as listeners grow.
2. **gateways** — 1 and then 2 real gateways (``python -m ws_gateway``) with
   ``--sockets`` sockets spread over them: the dialog latency (commit → frame) at
   ``--rate`` messages/s, then one burst of ``--burst`` messages on each of ``--dialogs``
   dialogs committed at once: notifications routed per second (every gateway routes every
   notification) and frames written to sockets per second; then ``--idle-sockets`` idle
   sockets over 2 fresh gateways, per GB of their RSS (:mod:`~replyx_ops.bench.notify_gateways`).

Writers and listeners run in this process, sockets in two worker processes: the load
generator's CPU share of the machine is reported next to each number (on 2 cores it
competes with what it measures), with Postgres's and the gateways' own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from dataclasses import asdict, dataclass

import asyncpg
import orjson
import psutil

from replyx.protocol import NOTIFY_CHANNEL
from replyx.settings import Settings
from replyx_ops.bench import notify_gateways
from replyx_ops.bench.notify_gateways import (
    CORES,
    GatewayBench,
    GatewayResult,
    GatewayWork,
    IdleResult,
    cpu_share,
)
from replyx_ops.bench.servers import BenchDatabase, Tenant

LISTENERS = (1, 2, 8, 32, 128)


@dataclass(frozen=True)
class CommitResult:
    listeners: int
    commits_per_s: float
    notifications_per_s_per_listener: float
    generator_cpu_share: float  # of the whole machine (all cores)
    postgres_cpu_share: float | None  # None: the server is not a process of this machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="a run under 60 s (the tests')")
    parser.add_argument("--seconds", type=float, default=None,
                        help="commit phase length per listener count (default 5; tiny 1.5)")
    parser.add_argument("--writers", type=int, default=4, help="writer connections (4)")
    parser.add_argument("--listeners", default=",".join(map(str, LISTENERS)),
                        help="listener counts, comma-separated (1,2,8,32,128)")
    parser.add_argument("--sockets", type=int, default=None,
                        help="sockets in the gateway phase (default 2000; tiny 200)")
    parser.add_argument("--dialogs", type=int, default=None,
                        help="dialogs in the gateway phase (default 200; tiny 40)")
    parser.add_argument("--burst", type=int, default=None,
                        help="messages per dialog in the gateway burst (default 20; tiny 5)")
    parser.add_argument("--rate", type=float, default=None,
                        help="messages/s in the gateways' latency phase (default 200; tiny 50)")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help="length of the gateways' latency phase (default 10; tiny 2)")
    parser.add_argument("--idle-sockets", type=int, default=None,
                        help="idle sockets over 2 gateways, for sockets per GB of RSS"
                        " (default 20000; tiny 400)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def main(settings: Settings, args: argparse.Namespace) -> int:
    tiny = bool(args.tiny)
    seconds = args.seconds or (1.5 if tiny else 5.0)
    sockets = args.sockets or (200 if tiny else 2000)
    dialogs = args.dialogs or (40 if tiny else 200)
    burst = args.burst or (5 if tiny else 20)
    work = GatewayWork(sockets=sockets, burst=burst, rate=args.rate or (50.0 if tiny else 200.0),
                       seconds=args.latency_seconds or (2.0 if tiny else 10.0),
                       warmup=0.5 if tiny else 2.0,
                       idle_sockets=args.idle_sockets or (400 if tiny else 20_000),
                       pause=0.5 if tiny else 2.0)
    listeners = [int(n) for n in args.listeners.split(",") if n.strip()]
    started = time.monotonic()
    db = BenchDatabase(settings.database_url, settings.data_dir)
    try:
        # A server's max_connections (100 by default) may not take 128 more sessions: the
        # counts that do not fit are reported as skipped, not run into "too many clients".
        room = asyncio.run(_free_connections(db.url)) - args.writers - 30
        skipped = [n for n in listeners if n > room]
        for n in skipped:
            note(f"{n:>4} listeners: skipped, the server has room for {room} more sessions")
        commits = [asyncio.run(_commit_phase(db.url, n, args.writers, seconds))
                   for n in listeners if n <= room]
        for row in commits:
            note(f"{row.listeners:>4} listeners: {row.commits_per_s:8.0f} commits/s")
        jwt_secret = secrets.token_urlsafe(48)
        tenant = Tenant(db, jwt_secret.encode())
        dialog_ids = tenant.add_dialogs(dialogs, widget_share=0)
        bench = GatewayBench(settings, db, tenant, jwt_secret, dialog_ids, work)
        try:
            gateways: list[GatewayResult] = []
            for n in (1, 2):
                g = bench.run(n)
                gateways.append(g)
                note(f"{n} gateway(s): p99 {g.latency_ms['p99']} ms at {g.rate_msgs_per_s:.0f}"
                     f" msg/s, {g.routed_per_s:.0f} routed/s, {g.frames_per_s:.0f} frames/s,"
                     f" generator CPU {g.latency_generator_cpu_share:.0%}/"
                     f"{g.generator_cpu_share:.0%}, lost {g.lost}")
            note(f"idle: {work.idle_sockets} sockets over 2 fresh gateways")
            idle = bench.idle(2)
        finally:
            bench.close()
    finally:
        db.drop()
    lost = sum(g.lost for g in gateways)
    result = {"commits": [asdict(r) for r in commits], "skipped_listeners": skipped,
              "gateways": [asdict(r) for r in gateways],
              "two_vs_one": notify_gateways.compare(gateways), "idle": asdict(idle),
              "lost": lost, "cores": CORES, "seconds": round(time.monotonic() - started, 1),
              "writers": args.writers, "workload": asdict(work)}
    print(table(commits, gateways, idle))
    if args.json:
        print(orjson.dumps(result).decode())
    return 0 if lost == 0 else 1


def table(commits: list[CommitResult], gateways: list[GatewayResult], idle: IdleResult) -> str:
    lines = ["listeners  commits/s  notifications/s per listener  generator CPU  Postgres CPU"]
    lines += [f"{r.listeners:>9}  {r.commits_per_s:>9.0f}"
              f"  {r.notifications_per_s_per_listener:>28.0f}"
              f"  {r.generator_cpu_share:>12.0%}  {_share(r.postgres_cpu_share):>12}"
              for r in commits]
    lines += ["", notify_gateways.table(gateways, idle)]
    lines.append(f"(CPU shares are of all {CORES} cores)")
    return "\n".join(lines)


# -- phase 1: commits/s against listener count --------------------------------------------


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


async def _postmaster(url: str) -> psutil.Process | None:
    """The postmaster of the server at ``url``, if it runs on this machine (the parent of
    this session's backend); not any other Postgres that happens to run here."""
    conn = await asyncpg.connect(url)
    try:
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid).parent()
            if parent is not None and parent.name() in ("postgres", "postmaster"):
                return parent
    finally:
        await conn.close()
    return None


def _postgres_cpu(postmaster: psutil.Process) -> float:
    """CPU seconds of that server so far: the postmaster and its live processes, and the
    backends that ended (their time is in the postmaster's children times once reaped)."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for proc in (postmaster, *postmaster.children()):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


class Counter:
    """A listener callback that only counts, as the gateway's does little more."""

    def __init__(self) -> None:
        self.count = 0
        self._moved = asyncio.Event()

    def __call__(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self.count += 1
        self._moved.set()

    async def wait_for(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline:
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), 0.5)


async def _free_connections(url: str) -> int:
    """Sessions the server still accepts: max_connections less those open now."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT current_setting('max_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity)"))
    finally:
        await conn.close()


async def _commit_phase(url: str, listeners: int, writers: int, seconds: float
                        ) -> CommitResult:
    counters = [Counter() for _ in range(listeners)]
    conns: list[asyncpg.Connection] = []
    for counter in counters:
        conn = await asyncpg.connect(url, server_settings={"application_name": "replyx-bench"})
        await conn.add_listener(NOTIFY_CHANNEL, counter)
        conns.append(conn)
    tenant_dialogs = await _dialogs(url, writers * 4)
    commits = 0
    stop = False

    async def write(k: int) -> None:
        nonlocal commits
        conn = await asyncpg.connect(url)
        try:
            i = 0
            while not stop:
                await conn.execute(
                    "INSERT INTO messages (dialog_id, sender, text) VALUES ($1, 'system', 'n')",
                    tenant_dialogs[(k + i * writers) % len(tenant_dialogs)])
                commits += 1
                i += 1
        finally:
            await conn.close()

    postmaster = await _postmaster(url)
    pg_before = _postgres_cpu(postmaster) if postmaster else 0.0
    cpu_before, wall = time.process_time(), time.monotonic()
    tasks = [asyncio.ensure_future(write(k)) for k in range(writers)]
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    took = time.monotonic() - wall
    done = commits
    # Drain: each listener must see every notification those commits sent.
    target = max(c.count for c in counters)
    for counter in counters:
        await counter.wait_for(target, 30)
    received = [c.count for c in counters]
    cpu = time.process_time() - cpu_before
    pg = _postgres_cpu(postmaster) - pg_before if postmaster else None
    elapsed = time.monotonic() - wall
    for conn in conns:
        await conn.close()
    return CommitResult(listeners, round(done / took, 1),
                        round(sum(received) / listeners / elapsed, 1),
                        round(cpu_share(cpu, elapsed), 3),
                        None if pg is None else round(cpu_share(pg, elapsed), 3))


async def _dialogs(url: str, count: int) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id",
            f"notify-{secrets.token_hex(4)}@replyx.invalid")
        assistant = await conn.fetchval(
            "INSERT INTO assistants (user_id, name, domains, site_token_hash)"
            " VALUES ($1, 'n', '{}', $2) RETURNING id", user, secrets.token_hex(16))
        rows = await conn.fetch(
            "INSERT INTO dialogs (assistant_id, channel) SELECT $1, 'site'"
            " FROM generate_series(1, $2) RETURNING id", assistant, count)
    finally:
        await conn.close()
    return [int(r["id"]) for r in rows]


def note(message: str) -> None:
    print(f"replyx bench notify: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m replyx_ops.bench.notify")
    add_arguments(parser)
    sys.exit(main(Settings.from_environ(), parser.parse_args()))

