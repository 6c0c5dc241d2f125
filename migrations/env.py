"""Alembic environment: runs revisions against the URL that `replyx migrate` resolved."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from replyx.pg import sqlalchemy_url

config = context.config


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: run migrations through `replyx migrate`")
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run `replyx migrate`")
run_migrations_online()
