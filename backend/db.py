"""The backend's database handle: one SQLAlchemy async engine (psycopg 3) per worker.

Invariant: a connection handed out by the pool was not closed by the server while
it sat idle. A restarted (or crashed) Postgres ends every session it had: the
server closes the socket, so an idle pooled connection whose socket has become
readable is dead, and it is replaced at checkout (:func:`_check_idle`) at the
cost of one ``poll`` — not a ``SELECT 1`` round trip per request, as SQLAlchemy's
``pool_pre_ping`` would do.

A single-statement write (a message, a typing event) runs on :meth:`Database.write`:
autocommit, so the statement is its own transaction and costs one round trip —
no ``BEGIN`` and no ``COMMIT`` of their own.
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from replyx.pg import sqlalchemy_url
from replyx.protocol import BACKEND_APPLICATION


class Database:
    """Engine and session factory. Built in each gunicorn worker, after the fork."""

    def __init__(
        self, url: str, *, pool_size: int = 5, max_overflow: int = 10, pooler: bool = False
    ) -> None:
        """:param pooler: ``url`` is a transaction pooler (pgbouncer): no prepared statements,
            which would be looked for on whatever server connection the next transaction gets.
        """
        self.engine = create_async_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=5,
            # A failed statement's message would otherwise quote its parameters (hashes,
            # message text) in the log line of the error.
            hide_parameters=True,
            connect_args={
                # Never hang a request on an unreachable server: fail fast with a 503.
                "connect_timeout": 5,
                "options": "-c statement_timeout=10000 -c lock_timeout=5000",
                "application_name": BACKEND_APPLICATION,
                **({"prepare_threshold": None} if pooler else {}),
            },
        )
        event.listen(self.engine.sync_engine, "checkout", _check_idle)
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A connection in autocommit: each statement commits on its own, in one round trip."""
        async with self.engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    async def dispose(self) -> None:
        await self.engine.dispose()


def _check_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pool checkout: refuse a connection the server closed (or wrote to) while it was idle.

    An idle session gets nothing from the server unless the server is ending it
    (shutdown, crash, ``pg_terminate_backend``): a readable socket means it is gone.
    SQLAlchemy then discards it and checks out another (or connects anew).
    """
    conn = dbapi_connection.driver_connection
    if conn is None or conn.closed or conn.broken:
        raise DisconnectionError("connection closed")
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if readable:
        raise DisconnectionError("the server closed the connection while it was idle")
