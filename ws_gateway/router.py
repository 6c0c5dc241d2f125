"""Where a NOTIFY becomes a frame: per-dialog fan-out with per-socket seq tracking.

Every socket (a :class:`Subscriber`) records ``sent_seq``, the last message seq
it was given. A message with seq ``s`` is written to a socket only when
``s == sent_seq + 1``; a lower seq is a duplicate and skipped; a higher one is
a gap, and the socket switches to *catching up*:

* while catching up, routed frames go to the socket's ``buffer`` instead of the wire;
* the missing messages are read from the database (``seq > sent_seq``) and written;
* the buffer is then drained in order, and the socket is live again.

A new socket joins the same way (it starts catching up from its ``since``), and
after the listener reconnects every socket catches up, which is what fills the
gap left by notifications lost while it was down. Catching up has no await
between "buffer drained" and "live", so nothing can slip between the two.

A join costs one database round trip: the handshake's query authorises the
socket and reads the dialog's ``last_seq`` and first replay page in one
snapshot (``store.*_opening``). Register-then-replay keeps that gap-free:
:meth:`Router.register` puts the socket in its dialog, buffering, and returns a
:class:`Mark` (tick, generation) *before* that query starts. A message
committed before the query's snapshot is in the page (or at most ``since``); one
committed after it is notified after its commit, so it is routed after the mark,
into the buffer, with a later tick, and the drain keeps it. A message lost in
between (the listener reconnected during the query) moved the generation on,
so the page is not trusted to go live and the catch-up queries again. A socket
refused by that query is removed before anything is written to it.

A catch-up may go live only on a query whose snapshot was taken while
notifications were flowing: when some may have been lost (the listener
reconnected, or a ``message_ref`` could not be read) the router's
``generation`` moves on, and a catch-up whose query began before that queries
again. Without this, a commit between a catch-up's snapshot and the new LISTEN
would be in neither and would reach the socket only with the next message.

Replayed frames are written in chunks of ``replay_chunk`` bytes, each waiting
until the socket has handed the previous one to the kernel, so a long replay
never overflows the per-socket write buffer of a client that reads normally.
Memory is bounded in bytes: see :mod:`ws_gateway.replay`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from replyx.backoff import Backoff
from replyx.logs import HeldLines
from replyx.protocol import CloseCode, FrameType, SocketKind
from ws_gateway.events import Event
from ws_gateway.frames import ready_frame, text_frame
from ws_gateway.limits import ByteBudget
from ws_gateway.metrics import Stats
from ws_gateway.replay import Mark, Page
from ws_gateway.store import GatewayStore

log = logging.getLogger("ws_gateway.router")

REPLAY_PAGE = 500


class Subscriber(Protocol):
    """One socket or SSE stream, as the router sees it (it never asks which)."""

    dialog_id: int
    sent_seq: int
    # Frames routed while catching up: (routing tick, seq, frame). None when live.
    buffer: list[tuple[int, int, bytes]] | None

    def write_frame(self, frame: bytes) -> bool:
        """Queue a complete frame; False when the socket is gone or closing."""

    async def drained(self) -> None:
        """Wait until what was queued so far has been handed to the kernel.

        A socket that cannot get there within its grace closes itself (4008) and returns.
        """

    @property
    def kind(self) -> str:
        """``admin``, ``widget`` or ``site`` (a :class:`~replyx.protocol.SocketKind`)."""

    @property
    def is_open(self) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...


class Router:
    """Dialog id → its sockets (:attr:`dialogs`), and the routing of events to them."""

    def __init__(
        self, store: GatewayStore, stats: Stats, *, replay_chunk: int = 256 * 1024,
        page_bytes: int = 1 << 20, budget: ByteBudget | None = None,
    ) -> None:
        self.store = store
        self.stats = stats
        self.replay_chunk = replay_chunk
        self.page_bytes = page_bytes
        self.budget = budget or ByteBudget(32 << 20)
        self.dialogs: dict[int, set[Subscriber]] = {}
        self._tick = 0  # counts routed message events; orders buffer entries against queries
        self._generation = 0  # moves on whenever notifications may have been lost
        self._tasks: set[asyncio.Task[None]] = set()
        # Dialogs still catching up after a listener reconnect; /health is 503 until zero.
        self.resyncing = 0
        self.broadcasts = HeldLines(log)  # flushed by the consumer once a batch is written

    # -- membership ----------------------------------------------------------

    def subscribers(self) -> Iterable[Subscriber]:
        for subs in self.dialogs.values():
            yield from subs

    def sockets_of(self, dialog_id: int) -> set[Subscriber]:
        return self.dialogs.get(dialog_id, set())

    def socket_count(self) -> int:
        return sum(len(subs) for subs in self.dialogs.values())

    def count_by_kind(self) -> dict[str, int]:
        """Sockets by kind, every kind present (from 0)."""
        counts = dict.fromkeys(map(str, SocketKind), 0)
        for sub in self.subscribers():
            counts[sub.kind] += 1
        return counts

    def remove(self, sub: Subscriber) -> None:
        subs = self.dialogs.get(sub.dialog_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self.dialogs[sub.dialog_id]

    def register(self, sub: Subscriber) -> Mark:
        """First half of a join: from now on every message of the dialog is buffered for ``sub``.

        Call it right before the handshake's query (which authorises the socket and
        reads its first replay page); the returned mark is where routing stood then.
        A refused socket is taken out again with :meth:`remove`.
        """
        sub.buffer = []
        sub.sent_seq = 0
        self.dialogs.setdefault(sub.dialog_id, set()).add(sub)
        return Mark(self._tick, self._generation)

    async def join(self, sub: Subscriber, start_seq: int, page: Page) -> None:
        """Second half: write ``page`` (rows with seq > ``start_seq``, read by a query that
        began after :meth:`register` gave its mark), catch up the rest, go live, send ``ready``.
        """
        sub.sent_seq = start_seq
        await self.catch_up(sub.dialog_id, [sub], announce=True, first=page)

    # -- routing ---------------------------------------------------------------

    def route(self, event: Event) -> None:
        """Route one parsed event (``message`` or ``typing``) to its dialog's sockets."""
        subs = self.dialogs.get(event.dialog_id)
        if event.kind != FrameType.MESSAGE:  # typing, read: ephemeral, to live sockets
            if subs:
                frame = text_frame(event.payload)
                for sub in tuple(subs):
                    if sub.buffer is None and sub.write_frame(frame):
                        self.stats.frames_sent += 1
            return
        self._tick += 1
        self.stats.messages_routed += 1
        if not subs:
            return
        self.broadcasts.add(
            "Broadcasting message dialog_id=%d seq=%d sockets=%d",
            event.dialog_id, event.seq, len(subs),
        )
        self.fan_out(event.dialog_id, event.seq, text_frame(event.payload), subs)

    def fan_out(self, dialog_id: int, seq: int, frame: bytes, subs: set[Subscriber]) -> None:
        """Write one pre-encoded frame to every live socket that expects exactly this seq."""
        sent = 0
        gapped: list[Subscriber] = []
        tick = self._tick
        for sub in tuple(subs):
            buffer = sub.buffer
            if buffer is not None:
                buffer.append((tick, seq, frame))
                continue
            expected = sub.sent_seq + 1
            if seq == expected:
                if sub.write_frame(frame):
                    sub.sent_seq = seq
                    sent += 1
            elif seq > expected:
                sub.buffer = [(tick, seq, frame)]
                gapped.append(sub)
            # seq < expected: already delivered (replayed from the database first).
        self.stats.frames_sent += sent
        if gapped:
            log.info(
                "gap in dialog %d: %d socket(s) expected seq %d, got %d; reading the database",
                dialog_id, len(gapped), min(s.sent_seq for s in gapped) + 1, seq,
            )
            self.spawn(self.catch_up(dialog_id, gapped))

    async def resolve_and_route(self, event: Event) -> None:
        """A ``message_ref`` (message too big for NOTIFY): read the row, then route it."""
        if not self.dialogs.get(event.dialog_id):
            self._tick += 1
            return
        try:
            payload = await self.store.message_by_ref(
                event.dialog_id, event.seq, event.message_id
            )
        except Exception as exc:
            # The row is committed but cannot be read now: treat it as a lost notification.
            # The dialog's sockets catch up from the database, which retries until it can.
            log.warning(
                "message_ref dialog_id=%d seq=%d unreadable (%s: %s); the dialog catches up",
                event.dialog_id, event.seq, type(exc).__name__, exc,
            )
            self._tick += 1
            self._generation += 1
            self.resync(event.dialog_id)
            return
        if payload is None:
            log.warning(
                "dropped message_ref dialog_id=%d seq=%d id=%d: no such message",
                event.dialog_id, event.seq, event.message_id,
            )
            self.stats.bad_notifications += 1
            return
        self.route(Event("message", event.dialog_id, event.seq, event.message_id, payload))

    def resync_all(self) -> None:
        """After the listener (re)connects: every socket catches up from the database.

        Sockets already catching up are left to their catch-up, which queries again
        because the generation moved on.
        """
        self._generation += 1
        dialogs = [dialog_id for dialog_id in self.dialogs if self.resync(dialog_id)]
        if dialogs:
            log.info("resyncing %d dialog(s) from the database", len(dialogs))

    def resync(self, dialog_id: int) -> bool:
        """Make the live sockets of one dialog catch up; False when none was live."""
        subs = [sub for sub in self.sockets_of(dialog_id) if sub.buffer is None]
        if not subs:
            return False
        for sub in subs:
            sub.buffer = []
        self.resyncing += 1
        self.spawn(self._resync(dialog_id, subs))
        return True

    async def _resync(self, dialog_id: int, subs: list[Subscriber]) -> None:
        try:
            await self.catch_up(dialog_id, subs)
        finally:
            self.resyncing -= 1

    # -- catching up -----------------------------------------------------------

    async def catch_up(
        self,
        dialog_id: int,
        subs: list[Subscriber],
        *,
        announce: bool = False,
        first: Page | None = None,
    ) -> None:
        """Bring buffering sockets of one dialog up to date, then make them live.

        ``first`` is a page already read (by a join's handshake query) and the mark
        taken before that query began; without it the first page is queried here.
        Retries with backoff while the database is unreachable; the sockets keep
        buffering meanwhile, so nothing routed in the meantime is lost.
        """
        pending = [s for s in subs if s.is_open]
        while pending:
            page, first = first, None
            if page is None:
                page = await self._next_page(dialog_id, pending)
                if page is None:
                    return
                pending = [s for s in pending if s.is_open]
            mark, rows, lease = page.mark, page.rows, page.lease
            page.rows, page.lease = [], None
            queued = size = 0
            count = len(rows)
            try:
                for seq, payload in rows:
                    frame = text_frame(payload)
                    for sub in pending:
                        # Rows come in seq order; normally seq == sent_seq + 1. A row deleted
                        # by hand leaves a hole, which must not stop the dialog for good.
                        if seq > sub.sent_seq and sub.write_frame(frame):
                            sub.sent_seq = seq
                            self.stats.frames_replayed += 1
                    queued += len(frame)
                    size += len(payload)
                    if queued >= self.replay_chunk:
                        # Routed frames keep going to the buffers while we wait.
                        pending = await self._drained(pending)
                        queued = 0
            finally:
                del rows  # the page goes before its room in the budget does
                if lease is not None:
                    lease.release()
            if size >= self.page_bytes or count == REPLAY_PAGE:
                # A long history: let the sockets drain before the next page.
                pending = await self._drained(pending)
                continue
            if self._generation != mark.generation:
                # Notifications may have been lost after this query's snapshot: query again.
                pending = [s for s in pending if s.is_open]
                continue
            # The database had nothing newer when the query ran. Drain the buffers: no await
            # from here to "live", so no routed frame can fall between the two.
            still: list[Subscriber] = []
            for sub in pending:
                if not sub.is_open:
                    continue
                if self._drain_buffer(sub, mark.tick):
                    sub.buffer = None
                    if announce:
                        sub.write_frame(ready_frame(dialog_id, sub.sent_seq))
                else:
                    still.append(sub)
            pending = still

    async def _next_page(
        self, dialog_id: int, subs: list[Subscriber]
    ) -> Page | None:
        """The next replay page for ``subs``, the mark taken before its query began, and the
        page's lease on the budget (taken before the query: the caller releases it).

        Waits out an unreachable database with backoff; None when every socket has
        left meanwhile, or after any other error (the sockets are closed with 1011).
        """
        backoff = Backoff(initial=0.2, maximum=5.0)
        while subs:
            lease = await self.budget.acquire(self.page_bytes)
            mark = Mark(self._tick, self._generation)
            try:
                rows = await self.store.messages_after(
                    dialog_id, min(s.sent_seq for s in subs), REPLAY_PAGE, self.page_bytes
                )
                lease.shrink(sum(len(payload) for _, payload in rows))
            except BaseException as exc:
                lease.release()
                if not isinstance(exc, Exception):
                    raise
                if not self.store.is_unavailable(exc):
                    log.exception("catch-up of dialog %d failed; closing its sockets", dialog_id)
                    for sub in subs:
                        sub.close(CloseCode.INTERNAL_ERROR, "internal error, resume with since")
                    return None
                log.warning("catch-up of dialog %d waits for the database (%s)", dialog_id, exc)
                await asyncio.sleep(backoff.next())
                subs = [s for s in subs if s.is_open]
                continue
            return Page(mark, rows, lease)
        return None

    @staticmethod
    async def _drained(subs: list[Subscriber]) -> list[Subscriber]:
        await asyncio.gather(*(s.drained() for s in subs if s.is_open))
        return [s for s in subs if s.is_open]

    def _drain_buffer(self, sub: Subscriber, tick_before: int) -> bool:
        """Write buffered frames in order; False if a gap remains (read the database again)."""
        buffer = sub.buffer or []
        for index, (tick, seq, frame) in enumerate(buffer):
            expected = sub.sent_seq + 1
            if seq < expected:
                continue
            if tick <= tick_before:
                # Routed before the query began, so its commit was visible to the query and
                # a real row would have been replayed (seq < expected). The database does
                # not have it: not one of our rows (a hand-made NOTIFY), even when its seq
                # happens to be the next one.
                if not sub.is_open:
                    continue  # the replay could not be written: the socket is going away
                log.warning(
                    "dropped notification dialog_id=%d seq=%d: not in the database",
                    sub.dialog_id, seq,
                )
                self.stats.bad_notifications += 1
                continue
            if seq == expected:
                if sub.write_frame(frame):
                    sub.sent_seq = seq
                    self.stats.frames_sent += 1
                continue
            sub.buffer = buffer[index:]
            return False
        return True

    # -- housekeeping ----------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("catch-up failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
