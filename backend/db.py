"""The backend's database handle: one SQLAlchemy async engine (psycopg 3) per worker."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

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
            # A restarted Postgres leaves dead connections in the pool: test before use.
            pool_pre_ping=True,
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
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    async def dispose(self) -> None:
        await self.engine.dispose()
