"""The client population: dialog sockets of every kind, behaving as real clients do.

A :class:`Subscriber` is one logical client: what a browser tab or a site
integration is over the whole soak. It reads through
:class:`~replyx_client.DialogClient` sessions, which reconnect with ``since``
after any resumable close; when a session ends on ``4001`` and its kind can get
a new credential (the operator panel re-issues its JWT), a new session resumes
from the last ``seq``. What it received is the concatenation of every session's
frames, which the checker compares with the database.

Each subscriber reads one endpoint (:mod:`.kinds`) over a WebSocket or over its
server-sent events twin (``transport="sse"``, resuming with ``Last-Event-ID`` as a
browser's EventSource does); the checker treats both alike. What it was last told
about presence is kept per connection for :mod:`.presence`. The inbox, whose view
is a state rather than a stream, is :mod:`.inbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.websocket import WebSocketClientConnection

from replyx.protocol import CloseCode
from replyx_client import DialogClient
from replyx_ops.chaos.kinds import KINDS, SocketKind, Tenancy


class Gate:
    """How a subscriber reads: at once, slowly (a pause per frame) or not at all (stalled)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.per_frame = 0.0

    async def before_read(self) -> None:
        await self.open.wait()
        if self.per_frame:
            await asyncio.sleep(self.per_frame)


class _GatedConnection:
    """The session's connection as :meth:`DialogClient._read` sees it: reads wait on the gate.

    A reader that does not read leaves frames in the kernel buffers and then in the
    gateway's, which is what a stalled browser tab does to the server.
    """

    def __init__(self, conn: Any, gate: Gate) -> None:
        self._conn = conn
        self._gate = gate

    async def read_message(self) -> Any:
        await self._gate.before_read()
        return await self._conn.read_message()


class ChaosDialogClient(DialogClient):
    """A :class:`DialogClient` whose reads go through a :class:`Gate` and that can be dropped."""

    gate: Gate

    async def _read(self, conn: Any) -> bool:
        return await super()._read(_GatedConnection(conn, self.gate))  # type: ignore[arg-type]

    def drop(self) -> None:
        """Close the current connection from the client side; the session then resumes."""
        conn = self._conn
        if isinstance(conn, WebSocketClientConnection):
            conn.close(CloseCode.NORMAL, "chaos: client drops")
        elif conn is not None:
            conn.close()  # an event stream: the client hangs up

    @property
    def is_connected(self) -> bool:
        return self.connects > len(self.close_codes)


@dataclass
class Received:
    """One message frame as a subscriber got it."""

    data: dict[str, Any]
    at: float  # time.time()
    session: int


@dataclass
class Subscriber:
    """One logical client over the soak; see the module doc."""

    name: str
    kind: SocketKind
    dialog_id: int
    since: int | None
    tenancy: Tenancy
    #: Seconds it stays (a burst client); ``None``: until the end of the soak.
    lifetime: float | None = None
    transport: str = "ws"
    #: The operator an admin socket logs in as (``None``: the tenant's owner).
    user_id: int | None = None
    gate: Gate = field(default_factory=Gate)
    sessions: list[ChaosDialogClient] = field(default_factory=list)
    renewals: int = 0
    gave_up: tuple[int | None, str | None] | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    _task: asyncio.Task[None] | None = None

    # -- running -----------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.time()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        since = self.since
        try:
            while True:
                session = ChaosDialogClient(
                    self.kind.url(self.tenancy, self.dialog_id, user_id=self.user_id),
                    origin=self.kind.origin, since=since, transport=self.transport,
                )
                session.gate = self.gate
                self.sessions.append(session)
                with contextlib.suppress(Exception):
                    await session.connect(timeout=1e6 if self.lifetime is None else 30)
                await session.wait_until(lambda s=session: s.final_close is not None,  # type: ignore[misc]
                                         1e7, "the end of the session")
                final = session.final_close
                assert final is not None
                since = session.last_seq
                if final.code == CloseCode.UNAUTHORIZED and self.kind.renewable:
                    self.renewals += 1  # a panel logs in again and resumes
                    continue
                self.gave_up = (final.code, final.reason)
                return
        finally:
            self.ended_at = time.time()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        # Bounded (a task that swallowed its cancellation once hung the soak's loop), and
        # without suppress(CancelledError), which hid the caller's own cancellation.
        await asyncio.wait({self._task}, timeout=10)
        for session in self.sessions:
            with contextlib.suppress(Exception):
                await session.close()
        if self.ended_at is None:
            self.ended_at = time.time()

    # -- what it saw -----------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The kind, and the transport when it is not a WebSocket: ``admin``, ``widget/sse``."""
        return self.kind.name + ("" if self.transport == "ws" else f"/{self.transport}")

    @property
    def operator(self) -> int | None:
        """The operator an admin socket makes online; ``None`` for the other kinds."""
        if self.kind.name != "admin":
            return None
        return self.user_id if self.user_id is not None else self.tenancy.tenant.user_id

    def presence_told(self) -> Any:
        """What the current connection was last told about presence: ``operators_online``
        (widget, site) or ``visitor_online`` (admin); ``None`` before its first presence frame
        (each connection gets one right after ``ready``)."""
        current = self.current
        if current is None:
            return None
        told = None
        for frame in list(current.frames):
            kind = frame.data.get("type")
            if kind == "ready":
                told = None
            elif kind == "presence":
                told = frame.data.get("visitor_online", frame.data.get("operators_online"))
        return told

    @property
    def current(self) -> ChaosDialogClient | None:
        return self.sessions[-1] if self.sessions else None

    @property
    def is_connected(self) -> bool:
        current = self.current
        return current is not None and current.is_connected

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def drop(self) -> None:
        if self.current is not None:
            self.current.drop()

    def shorten_token(self, ttl: int) -> None:
        """Reconnect now with a credential that expires in ``ttl`` seconds (kinds that have one).

        The gateway then closes the socket with 4001 when it expires (or refuses it, if it
        already has), and the subscriber renews it as a panel would.
        """
        current = self.current
        if current is None or not self.kind.renewable:
            return
        current.url = self.kind.url(self.tenancy, self.dialog_id, ttl, self.user_id)
        current.drop()

    @property
    def start_seq(self) -> int | None:
        """Where it started: ``since``; without one, the dialog's last seq when it joined.

        That is the first ``ready``'s ``last_seq``, unless messages came before that
        ``ready``: committed while the socket joined, they are part of its replay
        (``ready`` comes after the replay), and it started just before the first.
        """
        if self.since is not None:
            return self.since
        for session in self.sessions:
            for frame in list(session.frames):
                kind = frame.data.get("type")
                if kind == "message" and isinstance(frame.data.get("seq"), int):
                    return int(frame.data["seq"]) - 1
                if kind == "ready":
                    return int(frame.data["last_seq"])
        return None

    def received(self) -> list[Received]:
        out: list[Received] = []
        for index, session in enumerate(self.sessions):
            for frame in list(session.frames):
                if frame.data.get("type") == "message":
                    out.append(Received(frame.data, frame.received_at, index))
        return out

    def other_frames(self) -> list[Received]:
        """Every frame that is not a message (ready, typing, pong): checked for isolation."""
        return [Received(frame.data, frame.received_at, index)
                for index, session in enumerate(self.sessions)
                for frame in list(session.frames) if frame.data.get("type") != "message"]

    @property
    def last_seq(self) -> int | None:
        current = self.current
        return current.last_seq if current is not None else self.since

    def close_codes(self) -> list[int | None]:
        return [code for s in self.sessions for code in s.close_codes]


class Population:
    """Every subscriber of the soak: the steady ones and the bursts."""

    def __init__(self, tenancy: Tenancy, dialog_ids: list[int], rng: random.Random) -> None:
        self.tenancy = tenancy
        self.dialog_ids = dialog_ids
        self.rng = rng
        self.subscribers: list[Subscriber] = []
        self._count = 0
        #: The widget dialog without a steady visitor (see :meth:`populate`).
        self.coming_and_going: int | None = None

    def add(self, kind: str, dialog_id: int, since: int | None,
            lifetime: float | None = None, transport: str = "ws",
            user_id: int | None = None) -> Subscriber:
        self._count += 1
        name = f"{kind}{'' if transport == 'ws' else '-' + transport}-{self._count}"
        sub = Subscriber(name, KINDS[kind], dialog_id, since, self.tenancy,
                         lifetime=lifetime, transport=transport, user_id=user_id)
        self.subscribers.append(sub)
        return sub

    def populate(self, extra_admins: int = 2, slow_reader: float = 0.05) -> None:
        """Per dialog: an operator panel and the visitor's widget or the site integration,
        except one widget dialog whose visitor only comes and goes (bursts: its
        ``visitor_online`` moves); a few more panels that join "from now on" (``since``
        unset); one stream of each kind over SSE."""
        widget_dialogs = [d for d in self.dialog_ids if KINDS["widget"].accepts(self.tenancy, d)]
        self.coming_and_going = widget_dialogs[-1] if len(widget_dialogs) > 1 else None
        for dialog_id in self.dialog_ids:
            self.add("admin", dialog_id, 0)
            side = "widget" if dialog_id in widget_dialogs else "site"
            if dialog_id != self.coming_and_going:
                self.add(side, dialog_id, 0)
        for dialog_id in self.rng.sample(self.dialog_ids, min(extra_admins, len(self.dialog_ids))):
            self.add("admin", dialog_id, None)
        # A reader that is always a little slow (a busy tab on a weak phone).
        self.add("admin", self.rng.choice(self.dialog_ids), 0).gate.per_frame = slow_reader
        # Browsers on networks that block WebSockets: every kind once over server-sent events.
        for kind in KINDS.values():
            dialogs = [d for d in self.dialog_ids if kind.accepts(self.tenancy, d)
                       and d != self.coming_and_going]
            if dialogs:
                self.add(kind.name, self.rng.choice(dialogs), 0, transport="sse")

    async def start_all(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        for sub in self.subscribers:
            if sub._task is None:
                sub.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.is_connected for s in self.subscribers):
                return
            await asyncio.sleep(0.1)
        waiting = [s.name for s in self.subscribers if not s.is_connected]
        raise TimeoutError(f"sockets not connected within {timeout:.0f}s: {waiting[:10]}")

    def steady(self, kind: str | None = None) -> list[Subscriber]:
        return [s for s in self.subscribers
                if s.lifetime is None and (kind is None or s.kind.name == kind)]

    def pick(self, rng: random.Random, count: int, kind: str | None = None) -> list[Subscriber]:
        pool = [s for s in self.steady(kind) if s.running]
        return rng.sample(pool, min(count, len(pool)))

    def burst(self, rng: random.Random, count: int, last_seqs: Callable[[int], int | None]
              ) -> list[Subscriber]:
        """``count`` short-lived sockets on random dialogs, from the start, from a recent
        point or from now, each gone after a random fraction of a second to a few seconds."""
        made = []
        for _ in range(count):
            dialog_id = rng.choice(self.dialog_ids)
            kinds = [k for k, v in KINDS.items() if v.accepts(self.tenancy, dialog_id)]
            kind = rng.choice(kinds)
            start = rng.choice(("zero", "recent", "now"))
            known = last_seqs(dialog_id) or 0
            since = {"zero": 0, "recent": max(0, known - rng.randint(0, 5)), "now": None}[start]
            transport = rng.choice(("ws", "ws", "sse"))
            user_id = rng.choice(self.tenancy.operators) if kind == "admin" else None
            sub = self.add(kind, dialog_id, since, lifetime=round(rng.uniform(0.05, 3.0), 2),
                           transport=transport, user_id=user_id)
            sub.start()
            made.append(sub)
        return made

    async def expire_bursts(self) -> None:
        """Close the burst sockets whose time is up."""
        now = time.time()
        for sub in self.subscribers:
            if (sub.lifetime is not None and sub.running
                    and now - sub.started_at >= sub.lifetime):
                await sub.stop()

    def connected(self) -> int:
        return sum(1 for s in self.subscribers if s.is_connected)

    async def stop_all(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.subscribers), return_exceptions=True)
