"""Presence across gateways: which operators are online, which visitors are on the page.

Each gateway counts its own sockets — an operator is online for an assistant
while they hold an inbox or an admin dialog socket of it; a visitor is on the
page while a widget socket of the dialog is open — and publishes what changed
to Postgres (migration 0006): its rows in ``presence_operators`` /
``presence_visitors`` under its lease in ``gateways``. Every publish runs under
one advisory lock, applies this gateway's changes, computes the new totals of
the keys it touched over every gateway whose lease is live, and sends them in a
``presence`` NOTIFY. Publishes are serialised and NOTIFY is delivered in commit
order, so every gateway applies the same totals in the same order: the cache
``operators_online`` / ``visitors_online`` is the database's, not a guess.

Why it cannot leave a ghost online forever: a gateway renews its lease every
``heartbeat`` seconds; one that dies without a word (SIGKILL, host gone) stops
renewing, its lease ends after ``ttl`` seconds, and the next sweep of any live
gateway (each sweeps at every heartbeat) deletes it under the same lock and
publishes the new totals. A gateway whose row vanished (an expired lease, a
Postgres crash that empties the unlogged tables) registers again and publishes
its whole state. Whenever notifications may have been lost (listener
reconnect) the cache is reloaded from the tables.

Why it does not flap: a socket that closes is taken off only ``debounce``
seconds later, and a reconnect in the meantime (a page navigation, a 1012
restart resumed on any gateway) keeps the total where it was; a gateway that
shuts down keeps its lease ``debounce`` seconds so its clients can reconnect
elsewhere first. A total is only sent when it changed, and each socket gets at
most one presence frame per ``frame_interval`` (the latest value wins).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from replyx.protocol import FrameType, SocketKind
from ws_gateway.events import PresenceEvent
from ws_gateway.frames import text_frame
from ws_gateway.store import PresenceStore

log = logging.getLogger("ws_gateway.presence")

#: Keys per NOTIFY payload (each well under Postgres' 8000-byte limit).
KEYS_PER_NOTIFY = 200


class Watcher(Protocol):
    """A socket that is shown presence: widget and site (operators), admin (its visitor)."""

    dialog_id: int
    assistant_id: int
    presence: PresenceSlot

    @property
    def kind(self) -> SocketKind: ...

    def write_frame(self, frame: bytes) -> bool: ...

    @property
    def is_open(self) -> bool: ...


@dataclass
class PresenceSlot:
    """Per socket: what it was last told, and when (at most one frame per interval)."""

    sent: object = None
    sent_at: float = 0.0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Presence:
    def __init__(
        self,
        store: PresenceStore,
        *,
        ttl: float = 10.0,
        heartbeat: float = 2.0,
        debounce: float = 5.0,
        frame_interval: float = 1.0,
        publish_delay: float = 0.1,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.id = uuid.uuid4()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.debounce = debounce
        self.frame_interval = frame_interval
        self.publish_delay = publish_delay
        # What this gateway's own sockets make online.
        self.local_operators: Counter[tuple[int, int]] = Counter()  # (assistant, user)
        self.local_visitors: Counter[int] = Counter()  # dialog
        # Every gateway's totals, as published (only what is online is kept).
        self.operators_online: dict[int, int] = {}  # assistant → distinct operators
        self.visitors_online: set[int] = set()  # dialogs with a widget socket open
        self.watchers_of_assistant: dict[int, set[Watcher]] = {}
        self.watchers_of_dialog: dict[int, set[Watcher]] = {}
        self.on_visitor_change: Callable[[int], None] = lambda dialog_id: None
        self.last_heartbeat: float | None = None  # time.time() of the last renewed lease
        self.version = 0  # of the last totals applied (see PresenceStore.totals)
        self._published_operators: set[tuple[int, int]] = set()
        self._published_visitors: set[int] = set()
        self._removals: dict[object, asyncio.TimerHandle] = {}
        self._dirty = asyncio.Event()
        self._republish = True
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Register this gateway and learn every gateway's current presence."""
        await self.store.register(self.id, self.name, self.ttl)
        self.last_heartbeat = time.time()
        await self.reload()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Keep the lease ``debounce`` more seconds: clients reconnect elsewhere first.

        Both steps get one second together: across a partition, cancelling a publish
        waits for its rollback and the lease cannot be written; the pool's close ends
        those connections anyway, and the lease then simply runs out (``ttl``).
        """
        self._stopping = True
        for handle in self._removals.values():
            handle.cancel()
        pending: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self.store.linger(self.id, self.debounce))}
        if self._task is not None:
            self._task.cancel()
            pending.add(self._task)
        done, _ = await asyncio.wait(pending, timeout=1.0)
        for future in done:
            if not future.cancelled() and future.exception() is not None:
                log.warning("presence: could not shorten this gateway's lease (%s)",
                            future.exception())

    async def reload(self) -> None:
        """The totals of every gateway, from the tables (at start, after a listener loss)."""
        self.version, operators, visitors = await self.store.totals()
        self._apply(operators, [(d, True) for d in visitors], replace=True)

    # -- this gateway's sockets ----------------------------------------------------------

    def operator_on(self, assistant_id: int, user_id: int) -> None:
        self._count(self.local_operators, (assistant_id, user_id), +1)

    def operator_off(self, assistant_id: int, user_id: int) -> None:
        self._count(self.local_operators, (assistant_id, user_id), -1)

    def watch(self, sock: Watcher) -> None:
        """Start showing presence to ``sock`` (right after its ``ready``)."""
        if sock.kind == SocketKind.WIDGET:
            self._count(self.local_visitors, sock.dialog_id, +1)
        if sock.kind == SocketKind.ADMIN:
            self.watchers_of_dialog.setdefault(sock.dialog_id, set()).add(sock)
            self.operator_on(sock.assistant_id, sock.user_id)  # type: ignore[attr-defined]
        else:
            self.watchers_of_assistant.setdefault(sock.assistant_id, set()).add(sock)
        self._tell(sock)

    def unwatch(self, sock: Watcher) -> None:
        if sock.presence.timer is not None:
            sock.presence.timer.cancel()
        if sock.kind == SocketKind.WIDGET:
            self._count(self.local_visitors, sock.dialog_id, -1)
        if sock.kind == SocketKind.ADMIN:
            _discard(self.watchers_of_dialog, sock.dialog_id, sock)
            self.operator_off(sock.assistant_id, sock.user_id)  # type: ignore[attr-defined]
        else:
            _discard(self.watchers_of_assistant, sock.assistant_id, sock)

    def visitor_online(self, dialog_id: int) -> bool:
        return dialog_id in self.visitors_online

    def _count(self, counter: Counter[Any], key: Any, delta: int) -> None:
        before = counter[key]
        counter[key] = before + delta
        if counter[key] <= 0:
            del counter[key]
        if before == 0 and delta > 0:
            handle = self._removals.pop(key, None)
            if handle is not None:
                handle.cancel()  # back within the debounce: nothing ever changed
            else:
                self._dirty.set()
        elif before + delta == 0 and not self._stopping:
            loop = asyncio.get_running_loop()
            self._removals[key] = loop.call_later(self.debounce, self._removal_due, key)

    def _removal_due(self, key: object) -> None:
        self._removals.pop(key, None)
        self._dirty.set()

    # -- publishing and the lease ----------------------------------------------------------

    async def _run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), max(0.0, next_beat - time.monotonic()))
            except TimeoutError:
                pass
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat
                    await self._beat()
                if self._dirty.is_set() or self._republish:
                    await asyncio.sleep(self.publish_delay)  # coalesce a burst of changes
                    self._dirty.clear()
                    await self._publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database is away: keep counting; everything is published once it is back.
                log.warning("presence: %s: %s", type(exc).__name__, exc)
                self._republish = True
                await asyncio.sleep(self.heartbeat)

    async def _beat(self) -> None:
        if not await self.store.heartbeat(self.id, self.ttl):
            log.warning("presence: this gateway's lease was gone; registering again")
            await self.store.register(self.id, self.name, self.ttl)
            self._republish = True
        self.last_heartbeat = time.time()
        await self.store.sweep()

    async def _publish(self) -> None:
        operators = set(self.local_operators) | {
            k for k in self._removals if isinstance(k, tuple)}
        visitors = set(self.local_visitors) | {k for k in self._removals if isinstance(k, int)}
        replace = self._republish
        if replace:
            added_ops, removed_ops = operators, set()
            added_vis, removed_vis = visitors, set()
        else:
            added_ops = operators - self._published_operators
            removed_ops = self._published_operators - operators
            added_vis = visitors - self._published_visitors
            removed_vis = self._published_visitors - visitors
            if not (added_ops or removed_ops or added_vis or removed_vis):
                return
        await self.store.publish(
            self.id, replace, sorted(added_ops), sorted(removed_ops), sorted(added_vis),
            sorted(removed_vis), KEYS_PER_NOTIFY,
        )
        self._published_operators = operators
        self._published_visitors = visitors
        self._republish = False

    # -- totals from every gateway -------------------------------------------------------------

    def on_notification(self, event: PresenceEvent) -> None:
        """A ``presence`` NOTIFY: new totals, in commit order."""
        if event.version < self.version:
            return  # older than what reload() read (chunks of one publish share a version)
        self.version = event.version
        self._apply(event.operators, event.visitors, replace=False)

    def _apply(
        self, operators: Iterable[tuple[int, int]], visitors: Iterable[tuple[int, bool]],
        *, replace: bool,
    ) -> None:
        old_ops, old_vis = dict(self.operators_online), set(self.visitors_online)
        if replace:
            self.operators_online, self.visitors_online = {}, set()
        for assistant_id, count in operators:
            if count > 0:
                self.operators_online[assistant_id] = count
            else:
                self.operators_online.pop(assistant_id, None)
        for dialog_id, online in visitors:
            if online:
                self.visitors_online.add(dialog_id)
            else:
                self.visitors_online.discard(dialog_id)
        changed_assistants = {
            a for a in set(old_ops) | set(self.operators_online)
            if old_ops.get(a, 0) != self.operators_online.get(a, 0)
        }
        changed_dialogs = old_vis ^ self.visitors_online
        for assistant_id in changed_assistants:
            for sock in tuple(self.watchers_of_assistant.get(assistant_id, ())):
                self._tell(sock)
        for dialog_id in changed_dialogs:
            for sock in tuple(self.watchers_of_dialog.get(dialog_id, ())):
                self._tell(sock)
            self.on_visitor_change(dialog_id)

    # -- frames, at most one per socket per interval -------------------------------------------

    def _tell(self, sock: Watcher) -> None:
        slot = sock.presence
        if slot.timer is not None:
            return  # a frame is already due; it will carry the latest value
        wait = slot.sent_at + self.frame_interval - time.monotonic()
        if wait > 0:
            slot.timer = asyncio.get_running_loop().call_later(wait, self._send_due, sock)
        else:
            self._send(sock)

    def _send_due(self, sock: Watcher) -> None:
        sock.presence.timer = None
        if sock.is_open:
            self._send(sock)

    def _send(self, sock: Watcher) -> None:
        slot = sock.presence
        if sock.kind == SocketKind.ADMIN:
            value: object = sock.dialog_id in self.visitors_online
            frame = {"type": FrameType.PRESENCE.value, "dialog_id": sock.dialog_id,
                     "visitor_online": value}
        else:
            value = self.operators_online.get(sock.assistant_id, 0)
            frame = {"type": FrameType.PRESENCE.value, "operators_online": value}
        if value == slot.sent:
            return
        if sock.write_frame(text_frame(orjson.dumps(frame))):
            slot.sent, slot.sent_at = value, time.monotonic()

    # -- views ------------------------------------------------------------------------------

    def gauges(self) -> dict[str, float]:
        age = time.time() - self.last_heartbeat if self.last_heartbeat is not None else -1.0
        return {"operators": sum(self.operators_online.values()),
                "visitors": len(self.visitors_online), "heartbeat_age": age}

    def status(self) -> dict[str, Any]:
        return {
            "gateway_id": str(self.id),
            "heartbeat_age_s": (round(time.time() - self.last_heartbeat, 3)
                                if self.last_heartbeat is not None else None),
            "local": {"operators": len(self.local_operators), "visitors": len(self.local_visitors)},
            "online": {"operators": sum(self.operators_online.values()),
                       "assistants_with_operators": len(self.operators_online),
                       "visitors": len(self.visitors_online)},
        }


def _discard(index: dict[int, set[Watcher]], key: int, item: Watcher) -> None:
    items = index.get(key)
    if items is not None:
        items.discard(item)
        if not items:
            del index[key]
