"""Presence against the sockets actually open: what every open socket was last told must be
what our own clients have open, never what the gateways say about themselves.

Expected, from the soak's clients alone: ``operators_online`` (told to widget and
site sockets) is the number of distinct operators with an admin dialog socket or an
inbox open; ``visitor_online`` of a dialog (told to admin sockets, and shown in every
inbox entry) is whether a widget socket of that dialog is open. Told: each open
connection's last presence frame (one comes right after every ``ready``), each
open inbox's entries.

The gateways may lag the truth by design: a close counts only after the debounce
(5 s), a socket gets at most one presence frame a second, and a gateway that dies
without a word is forgotten within 15 s. So a check only runs when the soak is
quiet — no fault running or ended in the last :data:`FAULT_QUIET` seconds, and what
is open unchanged for :data:`SOCKETS_QUIET` seconds — and a difference must outlast
:data:`CONFIRM` more seconds of polling. What is left is counted: *ghost* when a
socket is told more than is open (an operator or a visitor who is gone), *missing*
when told less. The final check waits for quiet; a checkpoint that is not quiet
skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from replyx_ops.chaos.clients import Population
from replyx_ops.chaos.inbox import InboxWatcher

#: 15 s to forget a dead gateway's sockets, the frame interval, a margin.
FAULT_QUIET = 18.0
#: The 5 s debounce, the frame interval, a margin.
SOCKETS_QUIET = 7.5
CONFIRM = 6.0
POLL = 0.25


@dataclass(frozen=True)
class OpenState:
    operators: frozenset[int]  # user ids with an admin socket or an inbox open
    visitors: frozenset[int]  # dialogs with a widget socket open


def open_state(population: Population, inboxes: list[InboxWatcher]) -> OpenState:
    operators: set[int] = set()
    for sub in population.subscribers:
        if sub.operator is not None and sub.is_connected:
            operators.add(sub.operator)
    operators |= {population.tenancy.tenant.user_id for w in inboxes if w.is_connected}
    visitors = {s.dialog_id for s in population.subscribers
                if s.kind.name == "widget" and s.is_connected}
    return OpenState(frozenset(operators), frozenset(visitors))


def divergences(population: Population, inboxes: list[InboxWatcher],
                state: OpenState) -> list[dict[str, Any]]:
    """Every (open socket, key) whose last word is not ``state``."""
    out: list[dict[str, Any]] = []

    def differ(observer: str, kind: str, key: str, expected: Any, told: Any) -> None:
        more = (told is True and expected is False) or (
            isinstance(told, int) and not isinstance(told, bool) and told > expected)
        out.append({"kind": "ghost" if more else "missing", "observer": observer,
                    "socket_kind": kind, "key": key, "expected": expected, "told": told})

    for sub in population.subscribers:
        if not sub.is_connected or not sub.gate.open.is_set():
            continue  # a stalled reader has not read what it was told yet
        told = sub.presence_told()
        if sub.kind.name == "admin":
            expected: Any = sub.dialog_id in state.visitors
            key = f"visitor_online[{sub.dialog_id}]"
        else:
            expected, key = len(state.operators), "operators_online"
        if told != expected or type(told) is not type(expected):
            differ(sub.name, sub.label, key, expected, told)
    for watcher in inboxes:
        if not watcher.is_connected:
            continue
        shown = watcher.visitors_shown()
        for dialog_id in population.dialog_ids:
            expected = dialog_id in state.visitors
            if shown.get(dialog_id) is not expected:
                differ(watcher.name, f"inbox/{watcher.transport}",
                       f"visitor_online[{dialog_id}]", expected, shown.get(dialog_id))
    return out


@dataclass
class PresenceCheck:
    """Presence checks over one soak: when they ran and what they found."""

    population: Population
    inboxes: list[InboxWatcher]
    #: Seconds since the last fault ended (0 while one runs), from the soak.
    fault_quiet_for: Callable[[], float]
    t0: float = 0.0
    checks: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"ghost": 0, "missing": 0})
    first: dict[str, Any] | None = None
    _state: OpenState | None = None
    _since: float = 0.0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._track())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _track(self) -> None:
        """When did what is open last change (polled, so a socket that comes and goes
        between two polls is missed: the quiet periods are long enough not to mind)."""
        while True:
            state = open_state(self.population, self.inboxes)
            if state != self._state:
                self._state, self._since = state, time.monotonic()
            await asyncio.sleep(POLL)

    def quiet(self) -> bool:
        return (self._state is not None and self.fault_quiet_for() >= FAULT_QUIET
                and time.monotonic() - self._since >= SOCKETS_QUIET)

    async def check(self, *, final: bool, wait: float = 0.0) -> dict[str, Any] | None:
        """Check now if the soak is quiet (waiting up to ``wait`` seconds for it); ``None``
        when it was not."""
        deadline = time.monotonic() + wait
        while not self.quiet():
            if time.monotonic() >= deadline:
                if final:
                    skipped: dict[str, Any] = {"t": self._t(), "final": True,
                                               "skipped": "never quiet"}
                    self.checks.append(skipped)
                    return skipped
                return None
            await asyncio.sleep(POLL)
        found: list[dict[str, Any]] = []
        state = self._state
        confirm_until = time.monotonic() + CONFIRM
        while time.monotonic() < confirm_until:
            state = open_state(self.population, self.inboxes)
            found = divergences(self.population, self.inboxes, state)
            if not found or not self.quiet():
                break  # agreed; or something opened or closed: a difference may be its echo
            await asyncio.sleep(0.5)
        assert state is not None
        ghost = sum(1 for d in found if d["kind"] == "ghost")
        missing = len(found) - ghost
        entry: dict[str, Any] = {
            "t": self._t(), "final": final, "observers": self._observers(),
            "operators_open": len(state.operators), "visitors_open": sorted(state.visitors),
        }
        if found and not self.quiet():
            ghost = missing = 0
            entry["interrupted"] = len(found)
        entry.update(ghost=ghost, missing=missing)
        self.checks.append(entry)
        self.counts["ghost"] += ghost
        self.counts["missing"] += missing
        if (ghost or missing) and self.first is None:
            self.first = {**found[0], "t": entry["t"], "final": final,
                          "operators_open": sorted(state.operators),
                          "visitors_open": sorted(state.visitors),
                          "divergences": len(found), "others": found[1:6]}
        return entry

    def _observers(self) -> int:
        return (sum(1 for s in self.population.subscribers if s.is_connected)
                + sum(1 for w in self.inboxes if w.is_connected))

    def _t(self) -> float:
        return round(time.time() - self.t0, 1)

    def summary(self) -> dict[str, Any]:
        done = [c for c in self.checks if "skipped" not in c]
        return {
            "ghost_presence": self.counts["ghost"], "missing_presence": self.counts["missing"],
            "checks": len(done), "final_checked": any(c.get("final") for c in done),
            "observers_checked": sum(c["observers"] for c in done),
            "first_divergence": self.first, "history": self.checks,
        }
