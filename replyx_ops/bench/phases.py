"""The measured phases of ``replyx bench``, shared by its full run and its rounds.

:class:`Phases` owns what a benchmark run holds — its servers, database, socket
pool and poster — and measures one thing per method: latency under a steady
POST rate (with the servers' own stage timing), a fan-out burst, the routing
rate, memory per idle socket. Invariant: every server it starts is stopped,
and its database dropped, when :meth:`Phases.running` exits, however it exits.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

from replyx.settings import Settings
from replyx_ops.bench.load import Process, SocketPool
from replyx_ops.bench.measure import Progress, get_json, percentiles
from replyx_ops.bench.profiles import Workload
from replyx_ops.bench.servers import BenchDatabase, Server, Tenant, server_env
from replyx_ops.bench.stages import StageProbe, describe


class Phases:
    def __init__(self, settings: Settings, work: Workload, progress: Progress,
                 profile_dir: Path | None, keep_database: bool = False) -> None:
        self.settings = settings
        self.keep_database = keep_database
        self.work = work
        self.progress = progress
        self.profile_dir = profile_dir
        self.run_dir = settings.data_dir / "bench" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        self.jwt_secret = secrets.token_urlsafe(48)
        self.servers: list[Server] = []
        self.db: BenchDatabase | None = None
        self.pool: SocketPool | None = None
        self.poster: Process | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[Phases]:
        try:
            yield self
        finally:
            for server in reversed(self.servers):
                server.stop()
            if self.pool is not None:
                self.pool.stop()
            if self.poster is not None:
                self.poster.stop()
            if self.db is not None:
                self.db.drop(keep=self.keep_database)

    def start(self, factory: Callable[..., Server], *args: Any, **kwargs: Any) -> Server:
        server = factory(*args, **kwargs)
        self.servers.append(server)
        server.wait_healthy()
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        self.servers.remove(server)

    def env(self) -> dict[str, str]:
        assert self.db is not None
        return server_env(self.db.url, self.run_dir, self.jwt_secret,
                          REPLYX_LOG_LEVEL=self.settings.log_level or "INFO")

    # -- phases -------------------------------------------------------------------------------

    def open(self, group: str, specs: Sequence[tuple[int, str, str | None]]) -> None:
        assert self.pool is not None
        opened = self.pool.open(group, specs)
        self.progress(f"  {opened['opened']} {group} sockets open in {opened['seconds']:.1f}s")

    def latency_phase(self, tenant: Tenant, dialogs: list[int],
                      specs: Sequence[tuple[int, str, str | None]], port: int,
                      probe: StageProbe | None = None) -> dict[str, Any]:
        assert self.pool is not None and self.poster is not None
        work, say = self.work, self.progress
        say(f"latency: opening {len(specs)} sockets on {len(dialogs)} dialogs")
        self.open("latency", specs)
        paths = [tenant.post_path(d) for d in dialogs]
        say(f"  warm-up {work.warmup:.0f}s at {work.rate:.0f} msg/s")
        self.poster.call("post", host="127.0.0.1", port=port, paths=paths, rate=work.rate,
                         duration=work.warmup)
        self.pool.settle(["latency"], tenant.last_seqs(dialogs), 30)
        self.pool.record(True)
        say(f"  measuring {work.duration:.0f}s at {work.rate:.0f} msg/s")
        cpu_before = {server.name: server.cpu_seconds() for server in self.servers}
        if probe is not None:
            probe.start()
        posted = self.poster.call("post", host="127.0.0.1", port=port, paths=paths[::-1],
                                  rate=work.rate, duration=work.duration)
        settled = self.pool.settle(["latency"], tenant.last_seqs(dialogs), 60)
        stages = probe.stop() if probe is not None else None
        # CPU seconds each server spent per second of the run: who the bottleneck was.
        cpu_share = {
            server.name: round(
                (server.cpu_seconds() - cpu_before[server.name]) / posted["seconds"], 2
            )
            for server in self.servers
        }
        self.pool.record(False)
        bad = {k: v for k, v in posted["statuses"].items() if k != "201"}
        latency = percentiles(settled["latencies_ms"])
        say(f"  latency ms {latency}, lost {settled['lost']}, posted {posted['rate']:.0f}/s")
        say(f"  HTTP ms {percentiles(posted['http_ms'])}, INSERT to frame ms"
            f" {percentiles(settled['from_insert_ms'])}, POST to arrival ms"
            f" {percentiles(settled['arrival_ms'])}, server CPU/s {cpu_share}"
            + (f", HTTP errors {bad} {posted['errors']}" if bad or posted["errors"] else ""))
        if stages is not None:
            say(f"  stages p50/p99 ms: {describe(stages)}")
        return {
            "latency_ms": latency,
            "sockets": settled["sockets"],
            "rate_msgs_per_s": round(posted["rate"], 1),
            "lost": settled["lost"] + sum(bad.values()) + len(posted["errors"]),
            "frames": len(settled["latencies_ms"]),
            "http_ms": percentiles(posted["http_ms"]),
            "from_insert_ms": percentiles(settled["from_insert_ms"]),
            # POST to the frame's arrival at the load generator's kernel, before its read queue.
            "arrival_ms": percentiles(settled["arrival_ms"]),
            "server_cpu_per_s": cpu_share,
            "duplicates": settled["duplicates"],
            "gaps": settled["gaps"],
            "closed": settled["closed"],
            **({"stages": stages} if stages is not None else {}),
        }

    def burst(self, tenant: Tenant, dialog_ids: list[int], per_dialog: int,
              publish: str | None) -> float:
        """Commit ``per_dialog`` messages to each dialog in one transaction; return COMMIT start.

        ``publish`` names the peer's channel prefix: the peer's messages are published
        with ``pg_notify`` in the same transaction, exactly what broadcaster sends.
        """
        assert self.db is not None
        self.quiesce()
        with self.db.connect() as conn:
            conn.execute("BEGIN")
            if publish is None:
                conn.execute(
                    "INSERT INTO messages (dialog_id, sender, text)"
                    " SELECT d, 'system', 'burst' FROM generate_series(1, %s) i,"
                    " unnest(%s::bigint[]) d",
                    (per_dialog, dialog_ids),
                )
            else:
                conn.execute(
                    "WITH m AS (INSERT INTO messages (dialog_id, sender, text)"
                    "  SELECT d, 'system', 'burst' FROM generate_series(1, %s) i,"
                    "  unnest(%s::bigint[]) d RETURNING *)"
                    " SELECT count(pg_notify(%s || m.dialog_id, replyx_message_json(m)))"
                    "   FROM (SELECT * FROM m ORDER BY seq) m",
                    (per_dialog, dialog_ids, publish),
                )
            started = time.time()
            conn.execute("COMMIT")
        return started

    def quiesce(self) -> None:
        """Before a timed burst: the database's upkeep of what came before, done now.

        The turn before a burst inserted thousands of rows; left alone, autovacuum and the
        checkpointer take them up whenever their timers say, during one stack's burst and
        not another's. Done here, before every burst of every stack (as pgbench vacuums
        before its runs), each burst starts from the same state. CHECKPOINT needs a
        superuser (or pg_checkpoint); without one only the VACUUM runs.
        """
        assert self.db is not None
        with self.db.connect() as conn:
            conn.execute("VACUUM (ANALYZE) messages, dialogs")
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                conn.execute("CHECKPOINT")

    def fanout_phase(self, tenant: Tenant, dialogs: list[int], busy: int, server: Server,
                     label: str, busy_specs: list[tuple[int, str, str | None]],
                     publish: str | None = None) -> dict[str, Any]:
        assert self.pool is not None
        work, say = self.work, self.progress
        say(f"fan-out ({label}): {len(busy_specs)} sockets on one dialog")
        self.open("busy", busy_specs)
        profiler = self.start_profiler(server, label)
        results: dict[str, Any] = {}
        cases = [
            ("one_dialog", [busy], work.burst, ["busy"], len(busy_specs)),
            ("many_dialogs", dialogs, work.burst_per_dialog, ["latency"], 2 * len(dialogs)),
        ]
        for name, ids, per_dialog, groups, sockets in cases:
            results[name] = self.burst_case(tenant, name, ids, per_dialog, groups, sockets,
                                            publish, server)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            profiler.wait(30)
        total_frames = sum(r["frames"] for r in results.values())
        total_seconds = sum(r["seconds"] for r in results.values())
        results["frames_per_s"] = round(total_frames / total_seconds)
        results["lost"] = sum(r["lost"] for r in results.values() if isinstance(r, dict))
        return results

    def burst_case(self, tenant: Tenant, name: str, ids: list[int], per_dialog: int,
                   groups: list[str], sockets: int, publish: str | None,
                   server: Server | None = None) -> dict[str, Any]:
        """One burst (:meth:`burst`) read to the end by ``sockets`` sockets of ``groups``:
        frames/s from COMMIT start to the last frame, and ``server``'s CPU meanwhile."""
        assert self.pool is not None
        cpu_before = server.cpu_seconds() if server is not None else 0.0
        started = self.burst(tenant, ids, per_dialog, publish)
        settled = self.pool.settle(groups, tenant.last_seqs(ids), 120)
        seconds = max(settled["last_frame_at"] - started, 1e-6)
        frames = sockets * per_dialog
        result: dict[str, Any] = {
            "frames": frames,
            "notifications": len(ids) * per_dialog,
            "seconds": round(seconds, 3),
            "frames_per_s": round(frames / seconds),
            "notifications_per_s": round(len(ids) * per_dialog / seconds),
        }
        if server is not None:
            cpu = server.cpu_seconds() - cpu_before
            result["server_cpu_s"] = round(cpu, 3)
            # Independent of what else ran on the machine meanwhile.
            result["frames_per_cpu_s"] = round(frames / cpu) if cpu > 0 else None
        result["lost"] = settled["lost"]
        self.progress(f"  {name}: {frames} frames in {seconds:.2f}s = {frames / seconds:,.0f}/s,"
                      f" lost {settled['lost']}")
        return result

    def start_profiler(self, server: Server, label: str) -> Any:
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        target = server.processes()[-1].pid if label == "peer" else server.proc.pid
        out = self.profile_dir / f"{label}-fanout.collapsed.txt"
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(target),
             "--format", "raw", "--rate", "250", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        self.progress(f"  py-spy recording pid {target} into {out}")
        return proc

    def routing_phase(self, tenant: Tenant, dialogs: list[int], gateway_port: int
                      ) -> dict[str, Any]:
        assert self.db is not None and self.poster is not None and self.pool is not None
        work, say = self.work, self.progress
        say(f"routing: {work.commit_clients} clients commit single-row INSERTs"
            f" for {work.commit_seconds:.0f}s")
        health_url = f"http://127.0.0.1:{gateway_port}/health"
        self.poster.send("commit", dsn=self.db.url, dialog_ids=dialogs,
                         connections=work.commit_clients, duration=work.commit_seconds)
        queue: list[int] = []
        lag_ms: list[float] = []
        while not self.poster.conn.poll(0.25):
            with contextlib.suppress(OSError, ValueError):
                health = get_json(health_url)
                queue.append(int(health.get("queue") or 0))
                if health.get("notification_lag_ms") is not None:
                    lag_ms.append(float(health["notification_lag_ms"]))
        committed = self.poster.reply()
        settled = self.pool.settle(["latency"], tenant.last_seqs(dialogs), 60)
        rate = committed["commits"] / committed["seconds"]
        half = len(queue) // 2
        # Keeping up: the queue does not grow from the first half of the run to the second.
        keeps_up = bool(queue) and max(queue[half:] or [0]) <= max(10, 2 * max(queue[:half] or [0]))
        say(f"  Postgres committed {rate:,.0f}/s; gateway queue max {max(queue or [0])},"
            f" lag max {max(lag_ms or [0]):.1f} ms, lost {settled['lost']}")
        return {
            "pg_commit_per_s": round(rate),
            "queue_max": max(queue or [0]),
            "lag_ms_max": round(max(lag_ms or [0.0]), 2),
            "lag_ms_last": round(lag_ms[-1], 2) if lag_ms else None,
            "keeps_up": keeps_up,
            "lost": settled["lost"],
        }

    def memory_phase(self, server: Server, specs: Sequence[tuple[int, str, str | None]],
                     workers_only: bool) -> dict[str, Any]:
        assert self.pool is not None
        say = self.progress
        time.sleep(self.work.memory_settle)
        before = server.rss_bytes(workers_only)
        say(f"  {server.name} RSS {before / 1024:,.0f} kB; opening {len(specs)} idle sockets")
        self.open("idle", specs)
        time.sleep(self.work.memory_settle)
        after = server.rss_bytes(workers_only)
        per_socket = (after - before) / 1024 / len(specs)
        say(f"  RSS {after / 1024:,.0f} kB: {per_socket:.1f} kB per idle socket")
        self.pool.close("idle")
        return {"sockets": len(specs), "rss_kb_before": before // 1024,
                "rss_kb_after": after // 1024, "rss_kb_per_socket": round(per_socket, 2)}
