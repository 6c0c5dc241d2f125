"""Alembic from code: bring the schema to head, and refuse to run on any other revision."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import migrations

log = logging.getLogger("replyx.schema")

#: The NOTIFY channel every event travels on; operators `LISTEN replyx_events;` in psql.
CHANNEL = "replyx_events"


class SchemaMismatchError(RuntimeError):
    """The database is not at the newest migration."""


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(database_url: str) -> None:
    """Apply every pending migration (what ``replyx migrate`` does)."""
    command.upgrade(alembic_config(database_url), "head")


REVISION_SQL = "SELECT version_num FROM alembic_version"


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; ``None`` for a database Alembic never touched."""
    import psycopg
    from psycopg import errors

    from replyx.pg import libpq_url

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
    import psycopg

    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            return current_revision(database_url)
        except psycopg.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.1fs", type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def ensure_at_head(current: str | None) -> None:
    """Raise :class:`SchemaMismatchError` naming the fix unless ``current`` is the head."""
    head = head_revision()
    if current != head:
        found = "an empty database" if current is None else f"revision {current}"
        raise SchemaMismatchError(
            f"database schema is at {found}, this code needs {head}: run `replyx migrate`"
        )
