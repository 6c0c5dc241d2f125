"""One soak: the stack, the population, the writers, the schedule, checkpoints, the verdict.

Every check reads the truth on its own (the database, our own clients' sockets), never
from the gateways: delivery (:mod:`.checker`), inbox views (:mod:`.inbox`), presence
(:mod:`.presence`), acknowledged and rolled-back writes, ``/health`` of every gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from replyx.settings import Settings
from replyx_ops.bench.servers import Tenant
from replyx_ops.chaos.checker import Truth, Verdict, check, check_writes
from replyx_ops.chaos.clients import Population, Received
from replyx_ops.chaos.faults import FAULTS, KIND_SPECS, FaultSkipped, apply_proxy_modes
from replyx_ops.chaos.inbox import InboxWatcher, dialog_states, stale_entries
from replyx_ops.chaos.kinds import Tenancy
from replyx_ops.chaos.monitor import Sample, sample_forever
from replyx_ops.chaos.presence import PresenceCheck
from replyx_ops.chaos.proxy import LISTENER
from replyx_ops.chaos.schedule import FaultEvent, make_schedule
from replyx_ops.chaos.stack import ChaosDatabase, Stack
from replyx_ops.chaos.writers import HttpWriter, SqlWriter, WriteLog


@dataclass(frozen=True)
class Plan:
    seed: int
    soak_seconds: float
    gateways: int = 1
    dialogs: int = 8
    http_rate: float = 8.0
    sql_rate: float = 3.0
    inboxes: int = 2
    checkpoint_every: float = 20.0
    settle_timeout: float = 45.0
    nginx: bool = True
    #: Settings the stack runs with for the soak (documented in the report).
    stack_env: dict[str, str] = field(default_factory=lambda: {
        # Long outages must not push the listener's next attempt past the quiet tail.
        "REPLYX_BACKOFF_MAX": "5",
        # A smaller per-socket buffer, so that stalled readers do overflow it (4008).
        "REPLYX_SOCKET_BUFFER": "65536",
        "REPLYX_SLOW_CLOSE_GRACE": "5",
    })

    def schedule(self) -> list[FaultEvent]:
        return make_schedule(self.seed, self.soak_seconds, KIND_SPECS)


@dataclass
class Injected:
    event: FaultEvent
    started: float
    ended: float | None = None
    outcome: str = "running"  # injected | skipped | error
    detail: dict[str, Any] = field(default_factory=dict)


class Soak:
    def __init__(self, settings: Settings, plan: Plan, run_dir: Path,
                 say: Any) -> None:
        self.settings = settings
        self.plan = plan
        self.run_dir = run_dir
        self.say = say
        self.rng = random.Random(f"replyx-chaos-run:{plan.seed}")
        self.schedule = plan.schedule()
        self.writes = WriteLog()
        self.injected: list[Injected] = []
        self.samples: list[Sample] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.proxy_faults: list[tuple[int, str, str, float]] = []
        self.known: dict[int, int] = {}
        self.t0 = 0.0
        self.result: dict[str, Any] = {}
        # Built in run().
        self.db: ChaosDatabase
        self.stack: Stack
        self.tenant: Tenant
        self.population: Population
        self.http: HttpWriter
        self.sql: SqlWriter
        self.final_verdict: Verdict | None = None
        self.inboxes: list[InboxWatcher] = []
        self.presence: PresenceCheck | None = None

    def known_last_seq(self, dialog_id: int) -> int | None:
        return self.known.get(dialog_id)

    def fault_quiet_for(self) -> float:
        """Seconds since the last fault ended; 0 while one runs (or before the soak)."""
        if not self.injected:
            return time.time() - self.t0 if self.t0 else 0.0
        if any(r.ended is None for r in self.injected):
            return 0.0
        return time.time() - max(r.ended or 0.0 for r in self.injected)

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> None:
        plan = self.plan
        self.say(f"seed {plan.seed}: {len(self.schedule)} faults over {plan.soak_seconds:.0f}s")
        for event in self.schedule:
            self.say(f"  {event.describe()}")
        self.db = ChaosDatabase(self.settings.database_url, self.settings.data_dir)
        try:
            self.stack = Stack(self.settings, self.run_dir, self.db, nginx=plan.nginx,
                               gateways=plan.gateways, extra_env=plan.stack_env)
            try:
                self.say(f"database {self.db.name}; starting replyx run in {self.run_dir}")
                self.stack.start()
                self.say(f"stack up: clients via {self.stack.public_ws},"
                         f" posts via {self.stack.public_http}")
                self.tenant = Tenant(self.db, self.stack.jwt_secret.encode())
                dialogs = self.tenant.add_dialogs(plan.dialogs)
                asyncio.run(self.soak(dialogs))
            finally:
                self.say("stopping the stack")
                self.stack.stop()
        finally:
            self.db.drop()

    async def soak(self, dialogs: list[int]) -> None:
        plan = self.plan
        tenancy = Tenancy(self.tenant, self.stack.public_ws, self.stack.jwt_secret.encode())
        tenancy.add_operator()  # a team member whose panels only come and go (bursts)
        self.population = Population(tenancy, dialogs, random.Random(self.rng.random()))
        self.population.populate()
        prefix = f"c{plan.seed}-{int(time.time()) % 100000}"
        self.http = HttpWriter(self.writes, random.Random(self.rng.random()), plan.http_rate,
                               prefix, self.stack.public_http, self.tenant, dialogs,
                               self.tenant.operator_token)
        self.sql = SqlWriter(self.writes, random.Random(self.rng.random()), plan.sql_rate,
                             prefix, self.db.url, dialogs)
        # The panels' workspaces, every other one over SSE.
        self.inboxes = [InboxWatcher(f"inbox-{i + 1}", tenancy, "sse" if i % 2 else "ws")
                        for i in range(plan.inboxes)]
        for watcher in self.inboxes:
            watcher.start()
        await self.population.start_all(60)
        self.say(f"{len(self.population.subscribers)} sockets live; soak starts")
        self.t0 = time.time()
        monitor = asyncio.ensure_future(
            sample_forever(self.stack, self.population, self.t0, self.samples))
        self.presence = PresenceCheck(self.population, self.inboxes, self.fault_quiet_for,
                                      self.t0)
        self.presence.start()
        self.http.start()
        self.sql.start()
        runner = asyncio.ensure_future(self.run_schedule())
        next_checkpoint = self.t0 + plan.checkpoint_every
        try:
            while time.time() < self.t0 + plan.soak_seconds:
                await self.population.expire_bursts()
                if time.time() >= next_checkpoint:
                    next_checkpoint += plan.checkpoint_every
                    await self.checkpoint(final=False)
                await asyncio.sleep(0.25)
            self.say("soak over: writers stop, faults lift")
            await self.http.stop()
            await self.sql.stop()
            await self.lift_faults(runner)
            await self.last_words()
            await self.settle()
            await self.checkpoint(final=True)
            await self.check_inboxes()
            await self.check_presence(final=True)
            self.result["writes_check"] = await self.retry_db(
                lambda: check_writes(self.db.url, self.writes))
            self.result["health_end"] = await self.health_end()
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            await self.presence.stop()
            await self.population.stop_all()
            for watcher in self.inboxes:
                await watcher.stop()

    # -- faults ------------------------------------------------------------------------------

    async def run_schedule(self) -> None:
        tasks = []
        for event in self.schedule:
            delay = self.t0 + event.at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self.inject(event)))
        await asyncio.gather(*tasks, return_exceptions=True)

    async def inject(self, event: FaultEvent) -> None:
        record = Injected(event, time.time())
        self.injected.append(record)
        rng = random.Random(event.pick)
        try:
            record.detail = await FAULTS[event.kind].inject(self, event, rng)
            record.outcome = "injected"
        except FaultSkipped as exc:
            record.outcome, record.detail = "skipped", {"reason": str(exc)}
        except Exception as exc:
            record.outcome = "error"
            record.detail = {"error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc(limit=3)}
        record.ended = time.time()
        shown = {k: v for k, v in record.detail.items() if k != "trace"}
        self.say(f"  fault t={record.started - self.t0:6.1f}s {event.kind}: {record.outcome}"
                 f" {orjson.dumps(shown).decode()}")

    async def lift_faults(self, runner: asyncio.Future[None]) -> None:
        """Whatever is still running ends now (the schedule keeps a quiet tail, so little is)."""
        try:
            await asyncio.wait_for(asyncio.shield(runner), 20)
        except TimeoutError:
            runner.cancel()
        self.proxy_faults.clear()
        await asyncio.to_thread(apply_proxy_modes, self)
        for sub in self.population.subscribers:
            sub.gate.open.set()
            sub.gate.per_frame = 0.0

    async def last_words(self) -> None:
        """Every dialog's last message is committed while the LISTEN connection is cut off,
        and nothing is written after it: only the listener's catch-up from the database can
        deliver these (with writes going on, the next message's gap would hide its absence)."""
        await self.wait_healthy(30)
        proxy = self.stack.proxy
        await asyncio.to_thread(proxy.blackhole, [LISTENER])
        try:
            await asyncio.sleep(0.2)
            written = await self.sql.flood(self.population.dialog_ids, 1, 0)
            await asyncio.sleep(0.5)  # the NOTIFYs now wait in the proxy, which drops them:
            cut = await asyncio.to_thread(proxy.cut, [LISTENER])
        finally:
            await asyncio.to_thread(proxy.forward)
        self.result["last_words"] = {"dialogs": len(self.population.dialog_ids),
                                     "committed": bool(written), "listener_cut": cut}
        self.say(f"last words: {self.result['last_words']}")

    async def wait_healthy(self, timeout: float) -> bool:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1].status == 200:
                return True
            await asyncio.sleep(0.25)
        return False

    # -- checking ------------------------------------------------------------------------------

    async def retry_db(self, work: Any, attempts: int = 20) -> Any:
        for attempt in range(attempts):
            try:
                return await work()
            except Exception:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5)
        return None

    def snapshot(self) -> dict[str, list[Received]]:
        return {sub.name: sub.received() for sub in self.population.subscribers}

    async def checkpoint(self, *, final: bool) -> None:
        snapshots = self.snapshot()  # before the truth is read: every frame is committed
        try:
            truth = await Truth.read(self.db.url, self.population.dialog_ids)
        except Exception as exc:
            if final:
                truth = await self.retry_db(
                    lambda: Truth.read(self.db.url, self.population.dialog_ids))
            else:
                self.checkpoints.append({"t": round(time.time() - self.t0, 1),
                                         "skipped": f"database unreachable ({type(exc).__name__})"})
                return
        self.known = dict(truth.last_seq)
        verdict = check(self.population.subscribers, snapshots, truth, self.writes,
                                final=final)
        entry = {"t": round(time.time() - self.t0, 1), "final": final,
                 "rows": truth.total(), "messages_checked": verdict.messages_checked,
                 **verdict.counts}
        self.checkpoints.append(entry)
        self.say(f"  checkpoint t={entry['t']}s: {entry}")
        if final:
            self.final_verdict = verdict
            self.result["rows"] = truth.total()
        elif any(verdict.counts.values()) and "checkpoint_divergence" not in self.result:
            first = verdict.first()
            if first is not None:
                self.result["checkpoint_divergence"] = first.as_dict(self.t0)
        if not final:
            await self.check_presence(final=False)

    async def check_presence(self, *, final: bool) -> None:
        """Presence against the sockets open (:mod:`.presence`): at a checkpoint only when
        the soak is quiet; at the end, waiting for quiet (a gateway killed in the tail is
        forgotten within 15 s)."""
        assert self.presence is not None
        entry = await self.presence.check(final=final, wait=45.0 if final else 0.0)
        if entry is not None:
            self.say(f"  presence t={entry['t']}s: {entry}")

    async def check_inboxes(self) -> None:
        """Every inbox view must equal the dialogs' rows (waiting a little for the last
        updates: the inbox has no since, only snapshots and live entries)."""
        stale: list[dict[str, Any]] = []
        for _ in range(20):
            truth = await self.retry_db(
                lambda: dialog_states(self.db.url, self.population.dialog_ids))
            stale = stale_entries(self.inboxes, truth)
            if not stale:
                break
            await asyncio.sleep(0.5)
        self.result["inbox"] = {
            "watchers": len(self.inboxes), "stale_entries": len(stale),
            "first_stale": stale[0] if stale else None,
            "gave_up": {w.name: w.gave_up for w in self.inboxes if w.gave_up},
            **{k: sum(w.summary()[k] for w in self.inboxes)
               for k in ("snapshots", "updates", "repeats", "renewals")},
        }
        self.say(f"inbox: {self.result['inbox']}")

    async def settle(self) -> None:
        """Wait until the gateway is healthy and every steady socket has the last row."""
        deadline = time.monotonic() + self.plan.settle_timeout
        self.say("settling: waiting for every socket to catch up")
        while time.monotonic() < deadline:
            await self.population.expire_bursts()
            try:
                truth = await Truth.read(self.db.url, self.population.dialog_ids)
            except Exception:
                await asyncio.sleep(0.5)
                continue
            behind = [s for s in self.population.steady()
                      if s.gave_up is None
                      and (s.last_seq or 0) < truth.last_seq.get(s.dialog_id, 0)]
            if not behind and self.samples and self.samples[-1].status == 200:
                waited = self.plan.settle_timeout - (deadline - time.monotonic())
                self.say(f"settled in {waited:.1f}s")
                return
            await asyncio.sleep(0.5)
        self.say("not settled within the timeout")

    async def health_end(self) -> dict[str, Any]:
        client = AsyncHTTPClient(force_instance=True)
        out: dict[str, Any] = {}
        urls = {name: f"{url}/health" for name, url in self.stack.gateway_urls().items()}
        urls["backend"] = f"{self.stack.backend_http}/health"
        if self.stack.nginx:
            urls["nginx"] = f"{self.stack.public_http}/health"
        for name, url in urls.items():
            try:
                response = await client.fetch(HTTPRequest(url, request_timeout=5),
                                              raise_error=False)
                out[name] = response.code
            except Exception as exc:
                out[name] = f"{type(exc).__name__}"
        client.close()
        return out
