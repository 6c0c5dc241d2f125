"""Inbox sockets (``/ws/inbox``) in the soak, and their check against the database.

An :class:`InboxWatcher` is an operator panel's workspace over the whole soak: an
:class:`~replyx_client.InboxClient` that reconnects (a fresh snapshot each time)
and, on ``4001``, gets a new token as a panel would. At the end its view must
equal the database: for every dialog of the soak, ``last_seq``, both read marks
and ``unread`` as the ``dialogs`` row has them. A dialog whose entry differs (or
is missing) is a *stale inbox entry*. A watcher reads ``/ws/inbox`` or, with ``transport="sse"``,
its ``/sse/inbox`` twin; each entry's ``visitor_online`` is checked by :mod:`.presence`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import psycopg

from replyx.protocol import CloseCode
from replyx_client.inbox import InboxClient
from replyx_ops.chaos.kinds import Tenancy


@dataclass
class InboxWatcher:
    name: str
    tenancy: Tenancy
    transport: str = "ws"
    sessions: list[InboxClient] = field(default_factory=list)
    renewals: int = 0
    gave_up: tuple[int | None, str | None] | None = None
    _task: asyncio.Task[None] | None = None

    def url(self) -> str:
        return f"{self.tenancy.ws_base}/ws/inbox?token={self.tenancy.operator_token()}"

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            session = InboxClient(self.url(), transport=self.transport)
            self.sessions.append(session)
            with contextlib.suppress(Exception):
                await session.connect(timeout=1e6)
            await session.wait_until(lambda s=session: s.final_close is not None,  # type: ignore[misc]
                                     1e7, "the end of the session")
            final = session.final_close
            assert final is not None
            if final.code == CloseCode.UNAUTHORIZED:
                self.renewals += 1
                continue
            self.gave_up = (final.code, final.reason)
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=10)
        for session in self.sessions:
            with contextlib.suppress(Exception):
                await session.close()

    @property
    def is_connected(self) -> bool:
        current = self.sessions[-1] if self.sessions else None
        return current is not None and current.connects > len(current.close_codes)

    def view(self) -> dict[int, tuple[int, int, int, int]]:
        return self.sessions[-1].view() if self.sessions else {}

    def visitors_shown(self) -> dict[int, object]:
        """``dialog id → visitor_online`` as the current session's entries show it."""
        current = self.sessions[-1] if self.sessions else None
        if current is None:
            return {}
        return {d: e.get("visitor_online") for d, e in list(current.dialogs.items())}

    def summary(self) -> dict[str, Any]:
        return {
            "snapshots": sum(s.snapshots for s in self.sessions),
            "updates": sum(s.updates for s in self.sessions),
            "repeats": sum(s.stale for s in self.sessions),
            "renewals": self.renewals,
        }


async def dialog_states(dsn: str, dialog_ids: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """``dialog id → (last_seq, operator_read_seq, visitor_read_seq, unread)`` from the rows."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     connect_timeout=5) as conn:
        cur = await conn.execute(
            "SELECT id, last_seq, operator_read_seq, visitor_read_seq, unread FROM dialogs"
            " WHERE id = ANY(%s)", (dialog_ids,))
        return {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
                for r in await cur.fetchall()}


def stale_entries(watchers: list[InboxWatcher], truth: dict[int, tuple[int, int, int, int]]
                  ) -> list[dict[str, Any]]:
    """Every (watcher, dialog) whose inbox entry is not the database's row."""
    stale = []
    for watcher in watchers:
        view = watcher.view()
        for dialog_id, expected in sorted(truth.items()):
            got = view.get(dialog_id)
            if got != expected:
                stale.append({"client": watcher.name, "dialog_id": dialog_id,
                              "expected": list(expected), "got": list(got) if got else None})
    return stale
