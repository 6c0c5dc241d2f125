"""The client population: dialog sockets of every kind, behaving as real clients do.

A :class:`Subscriber` is one logical client: what a browser tab or a site
integration is over the whole soak. It reads through
:class:`~replyx_client.DialogClient` sessions, which reconnect with ``since``
after any resumable close; when a session ends on ``4001`` and its kind can get
a new credential (the operator panel re-issues its JWT), a new session resumes
from the last ``seq``. What it received is the concatenation of every session's
frames, which the checker compares with the database.

A socket kind is a small class (:class:`SocketKind` subclasses): the URL and
origin of its endpoint, which dialogs it may open, and whether a ``4001`` can be
cured. The inbox and SSE streams, when they exist, are new kinds here (with their
own check; the inbox, whose view is a state rather than a stream, is :mod:`.inbox`).
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

from replyx import security
from replyx.protocol import CloseCode
from replyx_client import DialogClient
from replyx_ops.bench.servers import Tenant


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
class Tenancy:
    """What kinds need to build URLs: the tenant, where sockets go, how tokens are issued."""

    tenant: Tenant
    ws_base: str
    jwt_secret: bytes
    token_ttl: int = 3600

    def operator_token(self, ttl: int | None = None) -> str:
        return security.issue_operator_token(self.tenant.user_id, self.jwt_secret,
                                             ttl or self.token_ttl)


class SocketKind:
    """One endpoint. Subclasses set ``name`` and build URLs."""

    name = ""
    #: A 4001 can be cured by a new credential (the panel logs in again).
    renewable = False
    origin: str | None = None

    def accepts(self, tenancy: Tenancy, dialog_id: int) -> bool:
        return True

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None) -> str:
        raise NotImplementedError


class AdminKind(SocketKind):
    name = "admin"
    renewable = True

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None) -> str:
        token = tenancy.operator_token(token_ttl)
        return f"{tenancy.ws_base}/ws/dialogs/{dialog_id}?token={token}"


class WidgetKind(SocketKind):
    name = "widget"
    origin = Tenant.ORIGIN

    def accepts(self, tenancy: Tenancy, dialog_id: int) -> bool:
        return dialog_id in tenancy.tenant.guest_tokens

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None) -> str:
        return tenancy.ws_base + tenancy.tenant.widget_path(dialog_id)


class SiteKind(SocketKind):
    name = "site"

    def accepts(self, tenancy: Tenancy, dialog_id: int) -> bool:
        return dialog_id not in tenancy.tenant.guest_tokens

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None) -> str:
        return tenancy.ws_base + tenancy.tenant.site_path(dialog_id)


KINDS: dict[str, SocketKind] = {k.name: k for k in (AdminKind(), WidgetKind(), SiteKind())}


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
                    self.kind.url(self.tenancy, self.dialog_id),
                    origin=self.kind.origin, since=since,
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
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        for session in self.sessions:
            with contextlib.suppress(Exception):
                await session.close()
        if self.ended_at is None:
            self.ended_at = time.time()

    # -- what it saw -----------------------------------------------------------------------

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
        current.url = self.kind.url(self.tenancy, self.dialog_id, ttl)
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

    def add(self, kind: str, dialog_id: int, since: int | None,
            lifetime: float | None = None) -> Subscriber:
        self._count += 1
        sub = Subscriber(f"{kind}-{self._count}", KINDS[kind], dialog_id, since, self.tenancy,
                         lifetime=lifetime)
        self.subscribers.append(sub)
        return sub

    def populate(self, extra_admins: int = 2, slow_reader: float = 0.05) -> None:
        """Per dialog: an operator panel and the visitor's widget or the site integration;
        a few more panels that join "from now on" (``since`` unset)."""
        for dialog_id in self.dialog_ids:
            self.add("admin", dialog_id, 0)
            side = "widget" if KINDS["widget"].accepts(self.tenancy, dialog_id) else "site"
            self.add(side, dialog_id, 0)
        for dialog_id in self.rng.sample(self.dialog_ids, min(extra_admins, len(self.dialog_ids))):
            self.add("admin", dialog_id, None)
        # A reader that is always a little slow (a busy tab on a weak phone).
        self.add("admin", self.rng.choice(self.dialog_ids), 0).gate.per_frame = slow_reader

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
            sub = self.add(kind, dialog_id, since, lifetime=round(rng.uniform(0.05, 3.0), 2))
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
