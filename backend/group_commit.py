"""Group commit: the hot single-statement writes of one worker that arrive together share
one transaction.

Every message and typing event commits a NOTIFY, and Postgres serialises those commits:
a committing transaction that notified holds a database-wide lock until its commit
record is flushed. Under load the commits queue behind each other's WAL flushes (at
1,000 msg/s the ``commit`` stage's p50 was 67 ms). Here, while a worker's commit is in
flight, the writes that arrive wait and then go together: one transaction, one
pipelined round trip, one flush and one turn of the lock for all of them. An idle
worker's write goes alone, as the single autocommit statement it always was.

Invariants:

* **Each write's outcome is its own.** A write answers with its statement's first row
  (``None``: it matched nothing) only once the transaction that holds it has committed.
  When the server refuses a batch (one statement's error rolls the whole transaction
  back, so nothing of it was committed), every write of it runs again alone, and only
  the write that fails alone fails. When the connection breaks, whether the commit
  happened is unknown: every write of the batch gets the error, exactly as a single
  statement would (the caller answers 503), and none is run again (that could store
  a message twice).
* **Order within a dialog is arrival order**, and a batch takes its dialogs' row locks
  in ascending dialog id (a stable sort by ``key``), so two workers' batches never wait
  for each other in a cycle.
* **At most** :data:`LANES` transactions per worker are in flight: a statement stuck
  behind a row lock holds up only its own lane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from backend import metrics

#: Transactions in flight at once per worker (each on its own pooled connection).
LANES = 2
#: Most writes in one transaction; more wait for the next one.
MAX_BATCH = 64

Row = tuple[Any, ...]


class Connections(Protocol):
    """Where the writes run: autocommit connections (``backend.db.WritePool``)."""

    def connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]: ...


@dataclass
class _Write:
    sql: str
    params: Mapping[str, object]
    key: int
    done: asyncio.Future[Row | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """Runs ``fetchone`` writes one at a time when idle, in shared transactions when busy."""

    def __init__(self, pool: Connections) -> None:
        self.pool = pool
        self._waiting: list[_Write] = []
        self._busy = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def fetchone(self, sql: str, params: Mapping[str, object], key: int) -> Row | None:
        """Run ``sql`` (one statement) and commit it; its first row, or ``None``.

        :param key: the dialog the statement writes to (lock order, and order within it).
        """
        if self._busy < LANES and not self._waiting:
            self._busy += 1
            try:
                return await self._alone(sql, params)
            finally:
                self._busy -= 1
                self._start_next()
        write = _Write(sql, params, key)
        self._waiting.append(write)
        self._start_next()
        return await write.done

    def _start_next(self) -> None:
        """Hand what waits to a free lane, as one transaction."""
        if not self._waiting or self._busy >= LANES:
            return
        batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        self._busy += 1
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Write]) -> None:
        try:
            if len(batch) == 1:
                await self._settle(batch[0])
            else:
                await self._together(batch)
        finally:
            self._busy -= 1
            self._start_next()

    async def _alone(self, sql: str, params: Mapping[str, object]) -> Row | None:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone()
        metrics.observe_commit(1)
        return row

    async def _settle(self, write: _Write) -> None:
        """Run one write alone and hand its outcome (row or error) to its caller."""
        try:
            row = await self._alone(write.sql, write.params)
        except BaseException as exc:
            _resolve(write, error=exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _resolve(write, row=row)

    async def _together(self, batch: list[_Write]) -> None:
        ordered = sorted(batch, key=lambda write: write.key)
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            async with self.pool.connection() as conn:
                async with conn.pipeline(), conn.transaction():
                    cursors = [await conn.execute(w.sql, w.params) for w in ordered]
                rows = [await cursor.fetchone() for cursor in cursors]
        except psycopg.Error as exc:
            if conn is None or conn.broken or conn.closed or exc.sqlstate is None:
                # The outcome is unknown (or nothing was sent): no write may run again.
                for write in batch:
                    _resolve(write, error=exc)
                return
            # The server refused the transaction, so none of it was committed: each
            # write again alone, in order (one after the other keeps a dialog's order).
            for write in ordered:
                await self._settle(write)
            return
        except BaseException as exc:
            for write in batch:
                _resolve(write, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        metrics.observe_commit(len(ordered))
        for write, row in zip(ordered, rows, strict=True):
            _resolve(write, row=row)


def _resolve(write: _Write, *, row: Row | None = None, error: BaseException | None = None) -> None:
    done = write.done
    if done.done():  # its caller was cancelled
        return
    if error is None:
        done.set_result(row)
    elif isinstance(error, Exception):
        done.set_exception(error)
    else:  # this worker is stopping (CancelledError, KeyboardInterrupt)
        done.cancel()
