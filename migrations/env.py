"""Alembic environment: runs revisions on the connection that ``replyx migrate`` opened.

``replyx.schema.upgrade`` opens it and passes it in ``config.attributes``; this
file imports nothing of the project, so the shared library never depends on it.
"""

from __future__ import annotations

from alembic import context

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("no database connection: run migrations through `replyx migrate`")
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run `replyx migrate`")
run_migrations_online()
