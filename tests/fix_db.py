"""The database under test: a fresh one per session, migrated to head.

Under pytest-xdist (``make test`` runs two workers) each worker is a session of its own,
so each has its own database and nothing one worker's test does to its database (a
killed LISTEN session, a restarted embedded server) reaches the other's.

With ``REPLYX_TEST_DATABASE_URL`` set (the suite's own variable, as psycopg's tests
use ``PSYCOPG_TEST_DSN``), a new database ``replyx_test_<random>`` is created on that
server and dropped afterwards. Without it, an embedded Postgres (pgserver's binaries)
is started in a temporary directory, so no test is ever skipped for want of a server.

``DATABASE_URL`` is the product's variable, never the suite's: a developer's shell
that has it set must not point the tests at that database. In-process apps get
their URL explicitly, and every child process gets :func:`child_environ`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from backend import store
from backend.db import Database
from replyx import schema, security
from replyx.pg import EmbeddedPostgres, libpq_url, with_database
from replyx.settings import Settings
from tests.fix_secrets import keep_logs_of, remember, watch_dir

T = TypeVar("T")

TEST_JWT_SECRET = "test-secret-" + "x" * 40
remember(TEST_JWT_SECRET, "the test JWT key")

TEST_DATABASE_VARIABLE = "REPLYX_TEST_DATABASE_URL"
#: Variables that choose a database in the product; children get theirs explicitly or none.
DATABASE_VARIABLES = ("DATABASE_URL", "REPLYX_LISTEN_DATABASE_URL", TEST_DATABASE_VARIABLE)


def child_environ(**env: str) -> dict[str, str]:
    """This process's environment for a child (``replyx …``), minus every database variable.

    The child then uses the embedded server of its data dir, or the URL given in ``env``.
    """
    base = {k: v for k, v in os.environ.items() if k not in DATABASE_VARIABLES}
    return {**base, **env}


def run_bench(command: list[str], tmp_path: Path, database_url: str
              ) -> subprocess.CompletedProcess[str]:
    """Run a benchmark command as a child: its own data dir under ``tmp_path``, the test
    JWT key, and ``database_url``'s server, where the bench makes (and drops) a database
    of its own."""
    env = child_environ(DATABASE_URL=database_url, REPLYX_DATA_DIR=str(tmp_path / "var"),
                        REPLYX_JWT_SECRET=TEST_JWT_SECRET)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                          check=False)


def run_async(work: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a worker thread.

    Sync fixtures use it, so they never disturb the event loop a test runs on.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


@contextlib.contextmanager
def new_database(server_url: str, prefix: str = "replyx_test") -> Iterator[str]:
    """An empty database ``<prefix>_<random>`` on the server of ``server_url``, dropped after."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = libpq_url(server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    server = os.environ.get(TEST_DATABASE_VARIABLE)
    if server:
        with new_database(server) as url:
            schema.upgrade(url)
            yield url
    else:
        with cluster_dir() as data_dir:
            embedded = EmbeddedPostgres(data_dir)
            url = embedded.ensure_running()
            schema.upgrade(url)
            yield url
            embedded.stop()


@contextlib.contextmanager
def cluster_dir() -> Iterator[Path]:
    """A data directory for an embedded cluster, outside pytest's temporary directories.

    Run as root, the embedded server runs as the unprivileged ``pgserver`` user, which
    must be able to reach its data directory. Every pytest session that starts resets
    ``/tmp/pytest-of-<user>`` to mode 0700, so a concurrent session would lock the
    server out of a cluster kept under ``tmp_path`` (pg_ctl: "Permission denied").
    """
    path = Path(tempfile.mkdtemp(prefix="replyx-test-"))
    watch_dir(path)  # its postgres.log is scanned for secrets too
    try:
        yield path
    finally:
        keep_logs_of(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg connection, for what an operator would type in psql."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def make_settings(data_dir: Path, **env: str) -> Settings:
    base = {
        "REPLYX_DATA_DIR": str(data_dir),
        "REPLYX_JWT_SECRET": TEST_JWT_SECRET,
        "REPLYX_PROBE_INTERVAL": "0.5",
        "REPLYX_PROBE_TIMEOUT": "1.0",
        "REPLYX_BACKOFF_MAX": "2",
        "REPLYX_LOG_LEVEL": "INFO",
    }
    base.update(env)
    return Settings.from_environ(base)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "var")


@dataclass
class Tenant:
    """An operator with one assistant: everything a test needs to open sockets."""

    user_id: int
    email: str
    password: str
    token: str
    assistant_id: int
    site_token: str
    domains: list[str]


def create_tenant(database_url: str, domains: list[str] | None = None) -> Tenant:
    domains = domains or ["https://shop.example"]
    email = f"op-{secrets.token_hex(6)}@example.com"
    password = secrets.token_urlsafe(12)

    async def work() -> Tenant:
        db = Database(database_url, pool_size=1, max_overflow=0)
        try:
            async with db.session() as session:
                user_id = await store.create_user(session, email, password)
                assistant = await store.create_assistant(session, user_id, "Assistant", domains)
        finally:
            await db.dispose()
        token = security.issue_operator_token(user_id, TEST_JWT_SECRET.encode(), 3600)
        remember(token, "operator JWT")
        remember(password, "operator password")
        remember(assistant.site_token, "site token")
        return Tenant(user_id, email, password, token, assistant.assistant_id,
                      assistant.site_token, domains)

    return run_async(work)


@pytest.fixture
def tenant(database_url: str) -> Tenant:
    return create_tenant(database_url)


@pytest.fixture
def make_tenant(database_url: str) -> Callable[..., Tenant]:
    return lambda domains=None: create_tenant(database_url, domains)
