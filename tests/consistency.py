"""Consistency of sockets with the database, and a steady poster: the fault tests' helpers.

After a fault, every socket of a dialog must hold exactly the dialog's rows
``seq`` 1..N (or from its starting point to N), in order, once, with the same
ids and texts the database has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import psycopg

from replyx_client import DialogClient
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant


async def database_rows(database_url: str, dialog_id: int) -> list[tuple[int, int, str]]:
    """``(seq, id, text)`` of every message of the dialog, in seq order."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT seq, id, text FROM messages WHERE dialog_id = %s ORDER BY seq", (dialog_id,)
        )
        return [(int(s), int(i), t) for s, i, t in await cursor.fetchall()]


async def assert_match_database(
    database_url: str,
    dialog_id: int,
    clients: list[DialogClient],
    *,
    first: dict[int, int] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> int:
    """Wait for every client to reach the dialog's last seq N, then check it holds 1..N exactly.

    :param first: ``id(client)`` → the first seq that client should have (default 1), for
        sockets that joined without ``since``.
    :returns: N
    """
    rows = await database_rows(database_url, dialog_id)
    last = len(rows)
    # The database itself has no hole: seq is 1..N.
    assert [seq for seq, _, _ in rows] == list(range(1, last + 1))
    for client in clients:
        start = (first or {}).get(id(client), 1)
        if last >= start:
            await client.wait_for_seq(last, timeout=timeout)
        expected = [(seq, mid, text) for seq, mid, text in rows if seq >= start]
        got = [(m["seq"], m["id"], m["text"]) for m in client.messages]
        assert client.seqs == list(range(start, last + 1)), client.safe_url
        assert got == expected, client.safe_url
        assert client.duplicates == 0, client.safe_url
        assert client.gaps == 0, client.safe_url
        assert {m["dialog_id"] for m in client.messages} <= {dialog_id}
    return last


@dataclass
class Poster:
    """Posts one message every ``1 / rate`` seconds in the background until stopped.

    ``post(i)`` returns an HTTP status code (or raises); each attempt is recorded.
    """

    post: Callable[[int], Awaitable[int]]
    rate: float = 40.0
    results: list[tuple[int, float]] = field(default_factory=list)  # (status, seconds taken)

    def __post_init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    def start(self) -> Poster:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        i = 0
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop:
            started = time.monotonic()
            try:
                status = await self.post(i)
            except Exception:
                status = 0
            self.results.append((status, time.monotonic() - started))
            i += 1
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    @property
    def created(self) -> int:
        return sum(1 for status, _ in self.results if status == 201)

    async def wait_created(self, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until ``count`` posts in all were created (201)."""
        await self._wait(lambda: self.created >= count, timeout, f"{count} posts created")

    async def wait_attempts(self, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until ``count`` posts in all were answered, whatever the answer."""
        await self._wait(lambda: len(self.results) >= count, timeout, f"{count} posts answered")

    async def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {what}: {len(self.results)} answered,"
                                   f" {self.created} created")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await self._task


async def open_three(
    sockets: Sockets, tenant: Tenant, dialog_id: int, guest: str, **kwargs: Any
) -> list[DialogClient]:
    """An admin, a widget and a site socket on one dialog."""
    return [
        await sockets.open(sockets.admin_url(tenant, dialog_id), **kwargs),
        await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                           origin=tenant.domains[0], **kwargs),
        await sockets.open(sockets.site_url(tenant, dialog_id), **kwargs),
    ]


def site_poster(api: Api, tenant: Tenant, dialog_id: int, rate: float) -> Poster:
    path = f"/api/site/dialogs/{dialog_id}/messages?site_token={quote(tenant.site_token)}"

    async def post(i: int) -> int:
        response = await api.request("POST", path, {"text": f"message {i}"})
        return response.code

    return Poster(post, rate)
