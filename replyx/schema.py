"""Alembic from code: bring the schema to head, and refuse to run on any other revision."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg import errors
from sqlalchemy import create_engine, pool

from replyx.backoff import Backoff
from replyx.pg import libpq_url, sqlalchemy_url

log = logging.getLogger("replyx.schema")


class SchemaMismatchError(RuntimeError):
    """The database is not at the newest migration."""


def _script_location() -> str:
    # Found, not imported: the migrations run inside Alembic, which loads them itself.
    spec = importlib.util.find_spec("migrations")
    assert spec is not None and spec.submodule_search_locations
    return str(next(iter(spec.submodule_search_locations)))


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", _script_location())
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(database_url: str) -> None:
    """Apply every pending migration (what ``replyx migrate`` does)."""
    _run(database_url, command.upgrade, "head")


def downgrade(database_url: str, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base``: an empty schema; tests only)."""
    _run(database_url, command.downgrade, revision)


def _run(database_url: str, alembic_command: Callable[[Config, str], None], revision: str) -> None:
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            config = alembic_config()
            # migrations/env.py runs the revisions on this connection (Alembic's
            # "sharing a connection" recipe), so it needs no URL handling of its own.
            config.attributes["connection"] = connection
            alembic_command(config, revision)
            connection.commit()
    finally:
        engine.dispose()


REVISION_SQL = "SELECT version_num FROM alembic_version"


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; ``None`` for a database Alembic never touched."""


    with psycopg.connect(libpq_url(database_url), connect_timeout=10) as conn:
        try:
            row = conn.execute(REVISION_SQL).fetchone()
        except errors.UndefinedTable:
            return None
    return row[0] if row else None


def wait_for_revision(database_url: str, timeout: float) -> str | None:
    """:func:`current_revision`, retried while the server cannot be reached.

    A process (re)started while Postgres restarts waits for it instead of exiting:
    a gunicorn worker that fails to boot takes its whole master down with it.
    """

    deadline = time.monotonic() + timeout
    backoff = Backoff(initial=0.5, maximum=5.0)
    while True:
        try:
            return current_revision(database_url)
        except psycopg.OperationalError as exc:
            delay = backoff.next()
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.1fs", type(exc).__name__, delay)
            time.sleep(delay)


def ensure_at_head(current: str | None) -> None:
    """Raise :class:`SchemaMismatchError` naming the fix unless ``current`` is the head."""
    head = head_revision()
    if current != head:
        found = "an empty database" if current is None else f"revision {current}"
        raise SchemaMismatchError(
            f"database schema is at {found}, this code needs {head}: run `replyx migrate`"
        )
