"""``replyx bench-notify``'s gateway phases: 1 and 2 gateways under one load, and idle memory.

For each gateway count, fresh gateways (``python -m ws_gateway``) on one database and
the same sockets, held by two load-generator processes
(:class:`~replyx_ops.bench.load.SocketPool`), worker *i* connected to gateway
*i* mod N; each dialog's sockets alternate between the workers, so with two
gateways every dialog has sockets on both, as nginx's round-robin upstream spreads them.

1. **latency** — messages committed at ``rate`` for ``seconds`` from a few connections of
   this process (one-statement INSERTs, each text stamped with the time just before the
   statement): commit → frame read at every socket, p50/p90/p99/max, and lost,
   duplicates and gaps against the database's ``last_seq``.
2. **burst** — ``burst`` messages on every dialog committed in one transaction:
   notifications routed per second (every gateway routes every notification) and frames
   written per second, from COMMIT start to the last frame read (as ``replyx bench``).
3. **idle** — two fresh gateways, ``idle_sockets`` idle site sockets spread over them: the
   gateways' RSS before and after, sockets per GB of RSS.

Invariant: the load generator's CPU (this process and its socket workers) and the
gateways' are measured over the same wall time as each rate, and reported next to it
as shares of all the machine's cores: on 2 cores the generator competes with the gateways.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psutil

from replyx.settings import Settings
from replyx_ops.bench.load import SocketPool
from replyx_ops.bench.measure import free_port, get_json, percentiles
from replyx_ops.bench.servers import BIN, BenchDatabase, Server, Tenant, server_env
from replyx_ops.bench.sseclient import Spec
from replyx_ops.bench.wsclient import STAMP_PREFIX

CORES = os.cpu_count() or 1
GB = 1024**3


@dataclass(frozen=True)
class GatewayWork:
    sockets: int
    burst: int
    rate: float
    seconds: float
    warmup: float
    idle_sockets: int
    pause: float  # before reading a fresh gateway's RSS, and after opening the idle sockets


@dataclass(frozen=True)
class GatewayResult:
    gateways: int
    sockets: int
    # The latency phase: commit -> frame at every socket, at rate_msgs_per_s.
    rate_msgs_per_s: float
    latency_ms: dict[str, float | None]
    latency_generator_cpu_share: float  # of the whole machine (all cores)
    latency_gateways_cpu_share: float
    lost: int
    duplicates: int
    gaps: int
    # The burst.
    notifications: int
    routed_per_s: float  # notifications routed, summed over gateways
    frames_per_s: float
    generator_cpu_share: float
    gateways_cpu_share: float


@dataclass(frozen=True)
class IdleResult:
    gateways: int
    sockets: int
    sockets_per_gateway: list[int]  # as each gateway's /health counts them
    rss_mb_before: float  # all gateways together
    rss_mb_after: float
    kb_per_socket: float
    sockets_per_gb: float  # sockets / the gateways' whole RSS
    sockets_per_gb_added: float  # sockets / what they added to it


class GatewayBench:
    """The gateway phases on one database and one tenant; the socket workers live across them."""

    def __init__(self, settings: Settings, db: BenchDatabase, tenant: Tenant, jwt_secret: str,
                 dialog_ids: list[int], work: GatewayWork) -> None:
        self.settings = settings
        self.db = db
        self.tenant = tenant
        self.jwt_secret = jwt_secret
        self.dialog_ids = dialog_ids
        self.work = work
        self.pool = SocketPool(2, "127.0.0.1", 0)  # each phase points the workers at its gateways

    def close(self) -> None:
        self.pool.stop()

    # -- plumbing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def gateways(self, count: int, tag: str) -> Iterator[list[Server]]:
        log_dir = self.settings.data_dir / "bench" / "notify"
        servers: list[Server] = []
        try:
            for i in range(count):
                port = free_port()
                env = server_env(self.db.url, self.settings.data_dir / "bench", self.jwt_secret,
                                 GATEWAY_PORT=str(port), REPLYX_GATEWAY_NAME=f"gateway-{i + 1}")
                servers.append(Server(f"notify-{tag}-gateway-{i + 1}",
                                      [str(BIN / "python"), "-m", "ws_gateway"], env, log_dir,
                                      f"http://127.0.0.1:{port}/health"))
            for server in servers:
                server.wait_healthy()
            ports = [int(s.health_url.rsplit(":", 1)[1].split("/")[0]) for s in servers]
            self.pool.all("target", per_worker=[
                {"host": "127.0.0.1", "port": ports[i % count]} for i in range(2)])
            yield servers
        finally:
            for server in servers:
                server.stop()

    def specs(self, count: int, path: Callable[[int], str]) -> list[Spec]:
        """``count`` sockets, dialog by dialog: the pool deals them out in turn, so a dialog's
        sockets alternate between the workers (and so between two gateways)."""
        per = -(-count // len(self.dialog_ids))
        specs: list[Spec] = [(d, path(d), None) for d in self.dialog_ids for _ in range(per)]
        return specs[:count]

    def generator_cpu(self) -> float:
        total = time.process_time()
        for worker in self.pool.workers:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(worker.proc.pid).cpu_times()
                total += t.user + t.system
        return total

    # -- 1 and 2: latency and burst ------------------------------------------------------

    def run(self, count: int) -> GatewayResult:
        work = self.work
        with self.gateways(count, f"{count}x") as servers:
            self.pool.open("notify", self.specs(work.sockets, self.tenant.admin_path))
            asyncio.run(_write(self.db.url, self.dialog_ids, work.rate, work.warmup))
            self.pool.settle(["notify"], self.tenant.last_seqs(self.dialog_ids), 60)

            self.pool.record(True)
            gen, gw, wall = self.generator_cpu(), _cpu(servers), time.monotonic()
            written = asyncio.run(_write(self.db.url, self.dialog_ids, work.rate, work.seconds))
            settled = self.pool.settle(["notify"], self.tenant.last_seqs(self.dialog_ids), 60)
            elapsed = time.monotonic() - wall
            lat_gen = cpu_share(self.generator_cpu() - gen, elapsed)
            lat_gw = cpu_share(_cpu(servers) - gw, elapsed)
            self.pool.record(False)

            with self.db.connect() as conn:
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT INTO messages (dialog_id, sender, text)"
                    " SELECT d, 'system', 'burst' FROM generate_series(1, %s) i,"
                    " unnest(%s::bigint[]) d ORDER BY i, d", (work.burst, self.dialog_ids))
                gen, gw, wall = self.generator_cpu(), _cpu(servers), time.monotonic()
                started = time.time()  # COMMIT start; the sockets stamp frames with time.time()
                conn.execute("COMMIT")
            burst = self.pool.settle(["notify"], self.tenant.last_seqs(self.dialog_ids), 120)
            elapsed = time.monotonic() - wall
            took = max(burst["last_frame_at"] - started, 1e-6)
            burst_gen = cpu_share(self.generator_cpu() - gen, elapsed)
            burst_gw = cpu_share(_cpu(servers) - gw, elapsed)
            self.pool.close("notify")
        notifications = len(self.dialog_ids) * work.burst
        return GatewayResult(
            gateways=count, sockets=settled["sockets"],
            rate_msgs_per_s=round(written["rate"], 1),
            latency_ms=percentiles(settled["latencies_ms"]),
            latency_generator_cpu_share=round(lat_gen, 3),
            latency_gateways_cpu_share=round(lat_gw, 3),
            lost=settled["lost"] + written["errors"] + burst["lost"],
            duplicates=settled["duplicates"], gaps=settled["gaps"],
            notifications=notifications,
            routed_per_s=round(notifications * count / took, 1),
            frames_per_s=round(work.sockets * work.burst / took, 1),
            generator_cpu_share=round(burst_gen, 3), gateways_cpu_share=round(burst_gw, 3))

    # -- 3: idle sockets per GB ----------------------------------------------------------

    def idle(self, count: int = 2) -> IdleResult:
        work = self.work
        with self.gateways(count, "idle") as servers:
            time.sleep(work.pause)
            before = sum(s.rss_bytes() for s in servers)
            self.pool.open("idle", self.specs(work.idle_sockets, self.tenant.site_path))
            time.sleep(work.pause)
            after = sum(s.rss_bytes() for s in servers)
            counts = [int(get_json(s.health_url).get("sockets") or 0) for s in servers]
            self.pool.close("idle")
        n = work.idle_sockets
        return IdleResult(
            gateways=count, sockets=n, sockets_per_gateway=counts,
            rss_mb_before=round(before / 2**20, 1), rss_mb_after=round(after / 2**20, 1),
            kb_per_socket=round((after - before) / 1024 / n, 2),
            sockets_per_gb=round(n / (after / GB)),
            sockets_per_gb_added=round(n / max((after - before) / GB, 1e-9)))


def _cpu(servers: list[Server]) -> float:
    return sum(s.cpu_seconds() for s in servers)


def cpu_share(cpu_seconds: float, elapsed: float) -> float:
    """CPU seconds over ``elapsed`` as a share of all the cores, at most 1.

    /proc counts another process's CPU in clock ticks (10 ms), so over a burst of a few
    tens of milliseconds several processes' readings can add up to more than the wall time
    holds; the share is then capped rather than reported as an impossible 116 %.
    """
    return min(1.0, cpu_seconds / elapsed / CORES)


async def _write(url: str, dialog_ids: list[int], rate: float, seconds: float,
                 connections: int = 8) -> dict[str, Any]:
    """INSERT one stamped message at a time, ``rate`` per second round-robin (open loop)."""
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    idle = collections.deque(conns)
    gate = asyncio.Semaphore(connections)  # one statement per connection at a time
    tasks: set[asyncio.Task[None]] = set()
    errors = 0

    async def one(dialog_id: int) -> None:
        nonlocal errors
        conn = idle.popleft()
        try:
            await conn.execute(
                "INSERT INTO messages (dialog_id, sender, text) VALUES ($1, 'system', $2)",
                dialog_id, f"{STAMP_PREFIX}{time.time():.6f}")
        except (OSError, asyncpg.PostgresError):
            errors += 1
        finally:
            idle.append(conn)
            gate.release()

    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    start = loop.time() + 0.05
    began = time.monotonic()
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        task = asyncio.ensure_future(one(dialog_ids[i % len(dialog_ids)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = time.monotonic() - began
    await asyncio.gather(*tasks)
    for conn in conns:
        await conn.close()
    return {"sent": total, "rate": total / sent_for if sent_for else 0.0, "errors": errors}


def compare(rows: list[GatewayResult]) -> dict[str, float | None]:
    """Two gateways against one: frames/s and p99 ratios (the target: 1.5)."""
    by = {r.gateways: r for r in rows}
    one, two = by.get(1), by.get(2)
    if one is None or two is None:
        return {}
    p1, p2 = one.latency_ms["p99"], two.latency_ms["p99"]
    return {"frames_per_s": round(two.frames_per_s / max(one.frames_per_s, 1e-9), 2),
            "p99": round(p2 / p1, 2) if p1 and p2 is not None else None}


def table(rows: list[GatewayResult], idle: IdleResult | None) -> str:
    lines = ["gateways  sockets  msgs/s  commit→frame p50/p99/max ms  generator CPU  gateways CPU"]
    for r in rows:
        lat = r.latency_ms
        cell = f"{lat['p50']} / {lat['p99']} / {lat['max']}"
        lines.append(f"{r.gateways:>8}  {r.sockets:>7}  {r.rate_msgs_per_s:>6.0f}  {cell:>27}"
                     f"  {r.latency_generator_cpu_share:>13.0%}"
                     f"  {r.latency_gateways_cpu_share:>12.0%}")
    lines += ["", "gateways  sockets  notifications  routed/s (all gateways)  frames/s"
                  "  generator CPU  gateways CPU"]
    lines += [f"{r.gateways:>8}  {r.sockets:>7}  {r.notifications:>13}  {r.routed_per_s:>23.0f}"
              f"  {r.frames_per_s:>8.0f}  {r.generator_cpu_share:>13.0%}"
              f"  {r.gateways_cpu_share:>12.0%}" for r in rows]
    lost = sum(r.lost for r in rows)
    lines.append(f"lost {lost}, duplicates {sum(r.duplicates for r in rows)},"
                 f" gaps {sum(r.gaps for r in rows)}")
    if idle is not None:
        lines += ["", f"idle: {idle.sockets:,} sockets over {idle.gateways} gateways"
                      f" ({' + '.join(f'{c:,}' for c in idle.sockets_per_gateway)}):"
                      f" RSS {idle.rss_mb_before:,.0f} → {idle.rss_mb_after:,.0f} MB,"
                      f" {idle.kb_per_socket} kB per socket, {idle.sockets_per_gb:,.0f} sockets"
                      f" per GB of RSS ({idle.sockets_per_gb_added:,.0f} per GB added)"]
    return "\n".join(lines)
