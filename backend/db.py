"""The backend's database handle: one SQLAlchemy async engine (psycopg 3) per worker.

Invariant: a connection handed out by the pool was not closed by the server while
it sat idle. A restarted (or crashed) Postgres ends every session it had: the
server closes the socket, so an idle pooled connection whose socket has become
readable is dead, and it is replaced at checkout (:func:`_check_idle`) at the
cost of one ``poll`` — not a ``SELECT 1`` round trip per request, as SQLAlchemy's
``pool_pre_ping`` would do.

A single-statement write (a message, a typing event) runs on :meth:`Database.write`,
the hot path: a psycopg connection of :class:`WritePool` in autocommit, so the
statement is its own transaction and costs one round trip — no ``BEGIN``, no
``COMMIT``, and none of SQLAlchemy's per-statement work (about 0.35 ms of CPU per
statement here; ``replyx bench`` shows it in the backend's ``commit`` stage). The
statement is prepared by psycopg after a few uses on a connection (not behind a
pooler). Everything else goes through the SQLAlchemy engine.
"""

from __future__ import annotations

import asyncio
import re
import select
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from backend.group_commit import GroupCommit
from replyx.pg import libpq_url, sqlalchemy_url
from replyx.protocol import BACKEND_APPLICATION


class Database:
    """Engine and session factory. Built in each gunicorn worker, after the fork."""

    def __init__(
        self, url: str, *, pool_size: int = 5, max_overflow: int = 10, pooler: bool = False
    ) -> None:
        """:param pooler: ``url`` is a transaction pooler (pgbouncer): no prepared statements,
            which would be looked for on whatever server connection the next transaction gets.
        """
        connect_args: dict[str, Any] = {
            # Never hang a request on an unreachable server: fail fast with a 503.
            "connect_timeout": 5,
            "options": "-c statement_timeout=10000 -c lock_timeout=5000",
            "application_name": BACKEND_APPLICATION,
            **({"prepare_threshold": None} if pooler else {}),
        }
        self.engine = create_async_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=5,
            # A failed statement's message would otherwise quote its parameters (hashes,
            # message text) in the log line of the error.
            hide_parameters=True,
            connect_args=connect_args,
        )
        event.listen(self.engine.sync_engine, "checkout", _check_idle)
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )
        self.writes = WritePool(libpq_url(url), connect_args, pool_size + max_overflow)
        #: The hot writes (messages, typing): alone when idle, sharing a commit when busy.
        self.group = GroupCommit(self.writes)

    def write(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """``async with db.write() as conn``: an autocommit psycopg connection (one statement,
        one round trip); :func:`driver_sql` turns a ``:name`` statement into its dialect."""
        return self.writes.connection()

    async def dispose(self) -> None:
        await self.writes.close()
        await self.engine.dispose()


class WritePool:
    """Autocommit psycopg connections for the hot single-statement writes.

    A few lines instead of psycopg_pool because a request must fail at once (503)
    when Postgres is down, as the engine's pool does: psycopg_pool keeps a client
    waiting for its whole timeout while it reconnects in the background. Idle
    connections are checked like the engine's (:func:`_alive`); at most ``size``
    are in use at once, and a caller waits up to 5 s for one (then 503, a timeout).
    """

    def __init__(self, url: str, connect_args: dict[str, Any], size: int) -> None:
        self.url = url
        self.connect_args = connect_args
        self.size = size
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the loop

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        slots = self._slots
        await asyncio.wait_for(slots.acquire(), 5)
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await self._take()
            yield conn
        finally:
            if conn is not None:
                await self._give_back(conn)
            slots.release()

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if _alive(conn):
                return conn
            await conn.close()
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                     **self.connect_args)

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        reusable = (not conn.closed and not conn.broken and len(self._idle) < self.size
                    and conn.info.transaction_status == TransactionStatus.IDLE)
        if reusable:
            self._idle.append(conn)
        else:
            with suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with suppress(Exception):
                await conn.close()


def driver_sql(sql: str) -> str:
    """A statement with SQLAlchemy's ``:name`` parameters in psycopg's ``%(name)s`` form."""
    assert "%" not in sql, "a literal % would need escaping"
    return _PARAM.sub(r"%(\1)s", sql)


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def _alive(conn: psycopg.AsyncConnection[Any] | None) -> bool:
    """Whether an idle pooled connection may be handed out: open, not broken, and its
    socket not readable — an idle session's socket turns readable only when the server
    ends it (shutdown, crash, ``pg_terminate_backend``) or writes to it."""
    if conn is None or conn.closed or conn.broken:
        return False
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    return not readable


def _check_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pool checkout: refuse a connection the server closed (or wrote to) while it was idle
    (:func:`_alive`); SQLAlchemy then discards it and checks out another (or connects anew).
    """
    if not _alive(dbapi_connection.driver_connection):
        raise DisconnectionError("the server closed the connection while it was idle")
