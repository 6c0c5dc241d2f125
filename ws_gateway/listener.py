"""The one LISTEN connection, and keeping it alive.

The asyncpg callback does almost nothing (``queue.put_nowait``); one consumer
task parses and routes. The connection is watched three ways: asyncpg's
termination callback (the server closed it), a probe query every
``probe_interval`` that must answer within ``probe_timeout`` (asyncpg sets no
TCP keepalive and notices a silently dead peer only when it sends), and the
consumer noticing nothing. On loss the listener reconnects with capped,
jittered backoff (:class:`replyx.backoff.Backoff`), re-LISTENs, and calls
``on_up`` so the router re-reads what it may have missed: NOTIFY is only a
hint, the database is the truth.

Invariant: ``on_up`` runs synchronously each time LISTEN is (re)established,
before any notification received on the new connection is routed; the loop
never ends except through :meth:`Listener.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

import asyncpg

from replyx.backoff import Backoff
from replyx.protocol import LISTENER_APPLICATION

log = logging.getLogger("ws_gateway.listener")

State = Literal["starting", "up", "down", "stopped"]

#: After a failed probe, how long to wait for asyncpg to report the session's end (it reads
#: the server's FATAL before the socket's close: a probe sent in between fails first).
TERMINATION_GRACE = 0.1


class Listener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        on_payload: Callable[[str], None],
        on_up: Callable[[], None],
        *,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_payload = on_payload
        self.on_up = on_up
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.backoff = Backoff(initial=0.25, maximum=backoff_max)
        self.state: State = "starting"
        self.backend_pid: int | None = None
        self.reconnects = 0
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.up_event = asyncio.Event()
        self._lost = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def is_up(self) -> bool:
        return self.state == "up"

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Start the loop and wait until the first LISTEN is in place."""
        self._task = asyncio.ensure_future(self._run())
        waiter = asyncio.ensure_future(self.up_event.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self._task in done:
                self._task.result()
            raise TimeoutError(f"LISTEN not established within {timeout:.0f}s: {self.last_error}")

    async def stop(self) -> None:
        self.state = "stopped"
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_conn()

    def stopped(self) -> bool:
        # A method, not a property: stop() changes the state while _run awaits.
        return self.state == "stopped"

    async def _run(self) -> None:
        while not self.stopped():
            try:
                await self._connect()
            except Exception as exc:
                # Whatever went wrong, this loop must go on: if it ended, the gateway would
                # stop delivering without anyone noticing.
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = self.backoff.next()
                log.warning("LISTEN connection failed (%s); retrying in %.1fs",
                            self.last_error, delay)
                await asyncio.sleep(delay)
                continue
            self.backoff.reset()
            if self.down_since is not None:
                self.reconnects += 1
                log.warning("LISTEN connection re-established after %.1fs (backend pid %s)",
                            time.monotonic() - self.down_since, self.backend_pid)
            else:
                log.info("LISTEN %s on backend pid %s", self.channel, self.backend_pid)
            self.state = "up"
            self.down_since = None
            self.up_event.set()
            # Synchronously, before any newly queued notification is routed.
            self.on_up()
            reason = await self._watch()
            if self.stopped():
                return
            self._mark_down(reason)
            await self._close_conn()

    def _mark_down(self, reason: str) -> None:
        self.state = "down"
        self.last_error = reason
        self.down_since = time.monotonic()
        self.up_event.clear()
        log.warning("LISTEN connection lost: %s", reason)

    async def _connect(self) -> None:
        self._lost.clear()
        conn = await asyncpg.connect(
            self.dsn,
            timeout=5,
            command_timeout=self.probe_timeout + 3,
            server_settings={"application_name": LISTENER_APPLICATION},
        )
        try:
            conn.add_termination_listener(self._on_terminated)
            await conn.add_listener(self.channel, self._on_notification)
            self.backend_pid = conn.get_server_pid()
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    def _on_notification(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if isinstance(payload, str):  # always, from a NOTIFY; asyncpg types it loosely
            self.on_payload(payload)

    def _on_terminated(self, conn: object) -> None:
        # asyncpg calls this with call_soon, so it may run after we dropped that connection
        # and opened the next one: only the current connection's end means "lost".
        if conn is self._conn:
            self._lost.set()

    async def _watch(self) -> str:
        """Return (with a reason) once the connection is known to be dead."""
        conn = self._conn
        assert conn is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self.probe_interval)
            if self._lost.is_set() or conn.is_closed():
                return "connection closed by the server"
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self.probe_timeout)
            except TimeoutError:
                return f"probe unanswered for {self.probe_timeout:.1f}s"
            except Exception as exc:
                # Not only OSError and asyncpg's errors: when the server ends the session in
                # the middle of the probe, asyncpg may raise InternalClientError ("cannot
                # switch to state 12"). In every case this connection is done; when its end
                # follows within TERMINATION_GRACE, that end is the reason.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), TERMINATION_GRACE)
                if self._lost.is_set() or conn.is_closed():
                    return "connection closed by the server"
                return f"probe failed: {type(exc).__name__}: {exc}"

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        # A silently dead peer would never answer a polite close: drop the socket.
        conn.terminate()
