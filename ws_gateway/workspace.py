"""The operator's workspace: inbox sockets and team changes.

An inbox socket (``/ws/inbox``) first gets a ``snapshot`` (the 100 most recently
active dialogs of every assistant its operator works on, and their total), then
``ready``, then a ``dialog`` frame whenever one of those dialogs is created,
gets a message or changes read state. The snapshot and the live stream meet
without a gap and without a stale entry, by the router's register-first
discipline:

1. Before the snapshot query starts, the socket is *pending*: every dialog
   event routed from then on goes to its buffer with the routing tick.
2. The query runs: one statement, so one database snapshot (the operator's
   assistants, their newest dialogs, the total).
3. The buffer is drained with no await until the socket is live. An event
   routed before the query began was committed before its snapshot, so the
   snapshot has it: dropped. A later one is written unless the snapshot holds
   that dialog at the same or a newer *version* — ``(last_seq,
   operator_read_seq, visitor_read_seq)`` only ever move forward, and every
   commit that changes a dialog moves one of them — so nothing committed after
   the snapshot is lost and nothing the snapshot already shows is repeated.
   Events arrive in commit order, so the last frame of a dialog is its newest state.

Whenever notifications may have been lost (the listener reconnected) or the
operator's teams changed (``operator_added`` / ``operator_removed``), the inbox
takes a fresh snapshot the same way; a client replaces its view with each
snapshot. An operator removed from a team has their dialog sockets of that
assistant closed with 4001 (their inbox just drops the assistant).

One encoding per event: a ``dialog`` event is rendered once, with
``visitor_online``, and the same bytes go to every inbox of its assistant; an
assistant with no inbox open costs one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import orjson

from replyx.backoff import Backoff
from replyx.protocol import CloseCode, FrameType, SocketKind
from ws_gateway.events import DialogEvent, TeamEvent, parse_dialog
from ws_gateway.frames import text_frame
from ws_gateway.presence import Presence
from ws_gateway.store import GatewayStore

log = logging.getLogger("ws_gateway.workspace")

_T = TypeVar("_T")

#: Dialogs in an inbox's snapshot; older ones page over HTTP (GET /api/dialogs?before=).
SNAPSHOT_DIALOGS = 100


class InboxSubscriber(Protocol):
    """An inbox socket, as the workspace sees it."""

    user_id: int
    assistants: frozenset[int]
    # Dialog events routed while a snapshot is taken: (tick, event). None when live.
    inbox_buffer: list[tuple[int, DialogEvent]] | None

    def write_frame(self, frame: bytes) -> bool: ...

    @property
    def is_open(self) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...


class OperatorSocket(Protocol):
    """A dialog socket of an operator (admin): closed when they leave the team."""

    user_id: int
    assistant_id: int

    @property
    def kind(self) -> SocketKind: ...

    def close(self, code: int, reason: str) -> None: ...


class Workspace:
    def __init__(self, store: GatewayStore, presence: Presence) -> None:
        self.store = store
        self.presence = presence
        self.visitor_online: Callable[[int], bool] = presence.visitor_online
        presence.on_visitor_change = self.visitor_changed
        # The newest state of every dialog an open inbox may hold (from snapshots and
        # events), so a change of visitor_online re-sends it without a database read.
        self.entries: dict[int, DialogEvent] = {}
        self.inboxes: dict[int, set[InboxSubscriber]] = {}  # assistant id → its inboxes
        self.pending: set[InboxSubscriber] = set()  # taking a snapshot
        self.inboxes_of: dict[int, set[InboxSubscriber]] = {}  # user id → their inboxes
        self.operator_sockets: dict[int, set[OperatorSocket]] = {}  # user id → admin sockets
        self._tick = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- membership ------------------------------------------------------------------

    async def join(self, sub: InboxSubscriber) -> None:
        """Snapshot, then ``ready``, then live; see the module docstring for the seam."""
        self.inboxes_of.setdefault(sub.user_id, set()).add(sub)
        await self._snapshot(sub)
        if sub.is_open:
            sub.write_frame(READY_FRAME)

    def remove(self, sub: InboxSubscriber) -> None:
        self.pending.discard(sub)
        self._unregister(sub)
        for assistant_id in sub.assistants:
            self.presence.operator_off(assistant_id, sub.user_id)
        sub.assistants = frozenset()
        _discard(self.inboxes_of, sub.user_id, sub)

    def add_operator_socket(self, sock: OperatorSocket) -> None:
        self.operator_sockets.setdefault(sock.user_id, set()).add(sock)

    def remove_operator_socket(self, sock: OperatorSocket) -> None:
        _discard(self.operator_sockets, sock.user_id, sock)

    def count(self) -> int:
        return sum(len(subs) for subs in self.inboxes_of.values())

    def wants_dialogs(self) -> bool:
        """Whether a ``dialog`` event could reach anyone here: an inbox is open or joining.

        When none is, dialog events are dropped unread: the tick they would move only
        orders events against snapshots, and a snapshot starts only after its inbox
        is pending, so from then on every event is routed again.
        """
        return bool(self.inboxes or self.pending)

    # -- events ----------------------------------------------------------------------

    def route(self, event: DialogEvent) -> None:
        """One dialog's new state, to every live inbox of its assistant (one encoding)."""
        self._tick += 1
        for sub in self.pending:
            assert sub.inbox_buffer is not None
            sub.inbox_buffer.append((self._tick, event))
        subs = self.inboxes.get(event.assistant_id)
        if not subs:
            return
        self.entries[event.dialog_id] = event
        frame = self.dialog_frame(event)
        for sub in tuple(subs):
            if sub.inbox_buffer is None:
                sub.write_frame(frame)

    def visitor_changed(self, dialog_id: int) -> None:
        """A visitor came or left (any gateway): inboxes holding the dialog get its entry."""
        event = self.entries.get(dialog_id)
        if event is not None:
            self.route(event)

    def team_changed(self, event: TeamEvent) -> None:
        if event.kind == FrameType.OPERATOR_REMOVED:
            for sock in tuple(self.operator_sockets.get(event.user_id, ())):
                if sock.assistant_id == event.assistant_id:
                    sock.close(CloseCode.UNAUTHORIZED, "removed from the assistant's team")
        for sub in tuple(self.inboxes_of.get(event.user_id, ())):
            if sub.inbox_buffer is None:
                log.info("[Inbox] team of user_id=%d changed (%s assistant_id=%d): new snapshot",
                         event.user_id, event.kind, event.assistant_id)
                self._spawn(self._snapshot(sub))

    def resync_all(self) -> None:
        """After the listener (re)connects: every live inbox takes a fresh snapshot."""
        live = [s for subs in self.inboxes_of.values() for s in subs if s.inbox_buffer is None]
        for sub in live:
            self._spawn(self._snapshot(sub))
        if live:
            log.info("resyncing %d inbox(es) from the database", len(live))

    def dialog_frame(self, event: DialogEvent) -> bytes:
        return text_frame(self._entry(event))

    # -- the seam --------------------------------------------------------------------

    async def _snapshot(self, sub: InboxSubscriber) -> None:
        sub.inbox_buffer = []
        self.pending.add(sub)
        backoff = Backoff(initial=0.2, maximum=5.0)
        try:
            while True:
                tick_before = self._tick
                try:
                    assistants, total, rendered = await self.store.inbox_snapshot(
                        sub.user_id, SNAPSHOT_DIALOGS
                    )
                    break
                except Exception as exc:
                    if not sub.is_open:
                        return
                    if not self.store.is_unavailable(exc):
                        log.exception("[Inbox] snapshot for user_id=%d failed", sub.user_id)
                        sub.close(CloseCode.INTERNAL_ERROR, "internal error, reconnect")
                        return
                    log.warning("[Inbox] snapshot for user_id=%d waits for the database (%s)",
                                sub.user_id, type(exc).__name__)
                    await asyncio.sleep(backoff.next())
        finally:
            self.pending.discard(sub)
            if not sub.is_open:
                sub.inbox_buffer = None
        if not sub.is_open:
            return
        # From here to "live" there is no await: nothing routed can fall in between.
        self._unregister(sub)
        before, sub.assistants = sub.assistants, frozenset(assistants)
        for assistant_id in sub.assistants:
            self.inboxes.setdefault(assistant_id, set()).add(sub)
        for assistant_id in sub.assistants - before:
            self.presence.operator_on(assistant_id, sub.user_id)
        for assistant_id in before - sub.assistants:
            self.presence.operator_off(assistant_id, sub.user_id)
        entries = [parse_dialog(orjson.loads(text)) for text in rendered]
        for entry in entries:
            if entry.dialog_id not in self.entries:
                self.entries[entry.dialog_id] = entry
        # What the snapshot shows of each dialog: its version and visitor_online.
        known = {e.dialog_id: (e.version, self.visitor_online(e.dialog_id)) for e in entries}
        sub.write_frame(text_frame(
            b'{"type":"snapshot","dialogs":[%s],"total":%d}'
            % (b",".join(self._entry(e) for e in entries), total)
        ))
        buffered, sub.inbox_buffer = sub.inbox_buffer or [], None
        for tick, event in buffered:
            if event.assistant_id not in sub.assistants or tick <= tick_before:
                continue
            seen = known.get(event.dialog_id)
            if (
                seen is not None
                and all(a <= b for a, b in zip(event.version, seen[0], strict=True))
                and self.visitor_online(event.dialog_id) == seen[1]
            ):
                continue
            sub.write_frame(self.dialog_frame(event))

    def _entry(self, event: DialogEvent) -> bytes:
        return orjson.dumps({"type": FrameType.DIALOG.value, **event.fields,
                             "visitor_online": self.visitor_online(event.dialog_id)})

    def _unregister(self, sub: InboxSubscriber) -> None:
        for assistant_id in sub.assistants:
            _discard(self.inboxes, assistant_id, sub)
            if assistant_id not in self.inboxes:
                # No inbox holds this assistant's dialogs any more: forget their states.
                for dialog_id in [d for d, e in self.entries.items()
                                  if e.assistant_id == assistant_id]:
                    del self.entries[dialog_id]

    # -- housekeeping ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("inbox snapshot failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


READY_FRAME = text_frame(b'{"type":"ready"}')


def _discard(index: dict[int, set[_T]], key: int, item: _T) -> None:
    items = index.get(key)
    if items is None:
        return
    items.discard(item)
    if not items:
        del index[key]
