"""The faults: one small class per kind, each drawing its own choices from the event's seed.

A fault's :meth:`Fault.inject` runs as its own task at the scheduled time and
returns a short description of what it did (which pid, which sockets); it may
last (a blackhole, a stalled reader) and overlap any other fault. New kinds
are new classes in :data:`FAULTS`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from typing import Any, ClassVar, Protocol

import psycopg

from replyx.protocol import LISTENER_APPLICATION
from replyx_ops.chaos.clients import Population
from replyx_ops.chaos.proxy import CLASSES, SCOPES
from replyx_ops.chaos.schedule import FaultEvent, KindSpec
from replyx_ops.chaos.stack import ChaosDatabase, Stack
from replyx_ops.chaos.writers import HttpWriter, SqlWriter


class Soak(Protocol):
    """What a fault acts on: the soak (:class:`replyx_ops.chaos.soak.Soak`) as faults see it."""

    stack: Stack
    db: ChaosDatabase
    population: Population
    http: HttpWriter
    sql: SqlWriter
    #: Active proxy faults: (event index, scope, mode, delay); see :func:`apply_proxy_modes`.
    proxy_faults: list[tuple[int, str, str, float]]

    def known_last_seq(self, dialog_id: int) -> int | None: ...


class FaultSkipped(Exception):
    """The fault could not be injected now (its target was not there)."""


class Fault:
    spec: ClassVar[KindSpec]

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError


#: How long a fault waits for its target (a process, a LISTEN session) to be there.
TARGET_WAIT = 25.0


async def _wait_pid(lookup: Any, timeout: float = TARGET_WAIT) -> int:  # noqa: ASYNC109
    """A pid from ``lookup()`` (run in a thread), waiting while the program restarts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        pids = await asyncio.to_thread(lookup)
        if pids:
            return int(pids[0]) if isinstance(pids, list) else int(pids)
        await asyncio.sleep(0.2)
    raise FaultSkipped("the process was not running")


class GatewayKill(Fault):
    """SIGKILL of one gateway (of N: which one is the event's seeded pick): no close frames;
    supervisord starts it again, and its sockets resume on any gateway nginx picks."""

    spec = KindSpec("gateway_sigkill", exclusive=True)
    sig = signal.SIGKILL

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        name = rng.choice(sorted(soak.stack.gateway_ports))
        for _ in range(3):
            pid = await _wait_pid(lambda: soak.stack.gateway_processes().get(name))
            try:
                os.kill(pid, self.sig)
            except ProcessLookupError:
                await asyncio.sleep(0.5)  # it died a moment ago (another fault): the next one
                continue
            return {"gateway": name, "pid": pid}
        raise FaultSkipped(f"{name} kept dying before the signal")


class GatewayTerm(GatewayKill):
    """SIGTERM of one gateway: its sockets closed with 1012, then supervisord restarts it."""

    spec = KindSpec("gateway_sigterm", exclusive=True)
    sig = signal.SIGTERM


class BackendWorkerKill(Fault):
    """SIGKILL of one gunicorn worker while a volley of posts is in flight."""

    spec = KindSpec("backend_worker_sigkill")

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        workers = await asyncio.to_thread(soak.stack.backend_workers)
        if not workers:
            workers = [await _wait_pid(soak.stack.backend_workers)]
        pid = rng.choice(sorted(workers))
        volley = asyncio.ensure_future(soak.http.volley(rng.randint(6, 12)))
        await asyncio.sleep(rng.uniform(0.01, 0.08))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already (gunicorn replaced it): the volley goes on regardless
        await volley
        return {"pid": pid}


class ListenerTerminate(Fault):
    """``pg_terminate_backend`` of the LISTEN connection (by its application_name)."""

    spec = KindSpec("listener_terminate")

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        # Overlapping faults (a gateway restart during a Postgres crash) can keep the listener
        # away for a while: wait for it rather than skip.
        deadline = loop.time() + TARGET_WAIT
        while loop.time() < deadline:
            try:
                async with await psycopg.AsyncConnection.connect(
                    soak.db.url, autocommit=True, connect_timeout=3
                ) as conn:
                    cur = await conn.execute(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE application_name = %s AND datname = current_database()"
                        " ORDER BY pid", (LISTENER_APPLICATION,))
                    pids = [int(pid) for (pid,) in await cur.fetchall()]
                    if pids:
                        # One of them: with several gateways, each has its own.
                        pid = rng.choice(pids)
                        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        return {"pid": pid, "listeners": len(pids)}
            except psycopg.Error:
                pass  # Postgres is down (a crash is running): try again
            await asyncio.sleep(0.3)
        raise FaultSkipped("no LISTEN session to terminate")


class PostgresCrash(Fault):
    """``pg_ctl stop -m immediate`` (a crash: no checkpoint), then a start (crash recovery)."""

    spec = KindSpec("postgres_crash", (1.0, 4.0), exclusive=True, weight=0.5)

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        if not soak.db.can_crash:
            raise FaultSkipped("DATABASE_URL names a server this command does not manage")
        await asyncio.to_thread(soak.db.crash)
        await asyncio.sleep(event.duration)
        await asyncio.to_thread(soak.db.restart)
        return {"down_s": event.duration}


class _ProxyFault(Fault):
    """Blackhole / delay between the gateway and Postgres, on the listener or every gateway
    connection. Overlapping proxy faults compose: the strongest active one applies."""

    mode = ""

    def params(self, rng: random.Random) -> dict[str, Any]:
        return {"scope": rng.choice(sorted(SCOPES)), "delay": round(rng.uniform(0.05, 0.6), 3)}

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        params = self.params(rng)
        entry = (event.index, params["scope"], self.mode, params["delay"])
        soak.proxy_faults.append(entry)
        await asyncio.to_thread(apply_proxy_modes, soak)
        try:
            await asyncio.sleep(event.duration)
        finally:
            soak.proxy_faults.remove(entry)
            await asyncio.to_thread(apply_proxy_modes, soak)
        return {"scope": params["scope"], **({"delay": params["delay"]}
                                               if self.mode == "delay" else {})}


def apply_proxy_modes(soak: Soak) -> None:
    proxy = soak.stack.proxy
    for cls in CLASSES:
        active = [f for f in soak.proxy_faults if cls in SCOPES[f[1]]]
        if any(f[2] == "blackhole" for f in active):
            proxy.blackhole([cls])
        elif active:
            proxy.delay([cls], max(f[3] for f in active))
        else:
            proxy.forward([cls])


class ProxyBlackhole(_ProxyFault):
    spec = KindSpec("proxy_blackhole", (1.0, 6.0))
    mode = "blackhole"


class ProxyDelay(_ProxyFault):
    spec = KindSpec("proxy_delay", (2.0, 6.0))
    mode = "delay"


class ProxyCut(Fault):
    """Reset every open connection of the listener, or of the whole gateway, at once."""

    spec = KindSpec("proxy_cut")

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        scope = rng.choice(sorted(SCOPES))
        cut = await asyncio.to_thread(soak.stack.proxy.cut, SCOPES[scope])
        return {"scope": scope, "connections": cut}


class SlowClients(Fault):
    """A few sockets read with a pause before every frame."""

    spec = KindSpec("slow_clients", (2.0, 8.0))

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        subs = soak.population.pick(rng, rng.randint(1, 4))
        pause = round(rng.uniform(0.02, 0.2), 3)
        for sub in subs:
            sub.gate.per_frame = pause
        await asyncio.sleep(event.duration)
        for sub in subs:
            sub.gate.per_frame = 0.0
        return {"clients": [s.name for s in subs], "pause_s": pause}


class StalledClients(Fault):
    """A few sockets stop reading altogether, then read again. Half the time a batch job
    commits megabytes to their dialogs meanwhile, so their buffers overflow: the gateway
    closes them with 4008 and they resume with ``since``."""

    spec = KindSpec("stalled_clients", (3.0, 12.0))

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        subs = soak.population.pick(rng, rng.randint(1, 3))
        flood = rng.random() < 0.5
        for sub in subs:
            sub.gate.open.clear()
        flooded = 0
        if flood:
            await asyncio.sleep(min(0.5, event.duration / 4))
            flooded = await soak.sql.flood(sorted({s.dialog_id for s in subs}), 40, 60_000)
        await asyncio.sleep(event.duration)
        for sub in subs:
            sub.gate.open.set()
        return {"clients": [s.name for s in subs], "flood_bytes": flooded}


class ConnectBurst(Fault):
    """Short-lived sockets open and close at once, and a few steady ones drop and resume."""

    spec = KindSpec("connect_burst", weight=1.5)

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        made = soak.population.burst(rng, rng.randint(5, 15), soak.known_last_seq)
        dropped = soak.population.pick(rng, rng.randint(1, 4))
        for sub in dropped:
            sub.drop()
        return {"opened": len(made), "dropped": [s.name for s in dropped]}


class TokenExpiry(Fault):
    """Operator panels get a token that expires in seconds: the gateway closes them with 4001,
    and each logs in again (a fresh JWT) and resumes with ``since``."""

    spec = KindSpec("token_expiry")

    async def inject(self, soak: Soak, event: FaultEvent, rng: random.Random) -> dict[str, Any]:
        subs = soak.population.pick(rng, rng.randint(1, 3), kind="admin")
        ttl = rng.randint(1, 3)
        for sub in subs:
            sub.shorten_token(ttl)
        return {"clients": [s.name for s in subs], "ttl_s": ttl}


FAULTS: dict[str, Fault] = {
    fault.spec.name: fault
    for fault in (
        GatewayKill(), GatewayTerm(), BackendWorkerKill(), ListenerTerminate(),
        PostgresCrash(), ProxyBlackhole(), ProxyDelay(), ProxyCut(), SlowClients(),
        StalledClients(), ConnectBurst(), TokenExpiry(),
    )
}
KIND_SPECS = [fault.spec for fault in FAULTS.values()]
