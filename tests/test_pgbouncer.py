"""The stack behind a real PgBouncer in transaction mode (Debian's pgbouncer, started here):
DATABASE_URL through it, REPLYX_LISTEN_DATABASE_URL straight to Postgres. The message path,
a killed LISTEN session, and `replyx check` naming pgbouncer when the LISTEN URL is one."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from backend.db import WritePool
from backend.group_commit import GroupCommit
from replyx import schema
from replyx.pg import libpq_url
from tests import test_group_commit as group_commit_test
from tests.consistency import assert_match_database, open_three, site_poster
from tests.fix_apps import Api, Sockets
from tests.fix_db import create_tenant, new_database
from tests.fix_stack import BIN, Stack
from tests.net import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def pgbouncer_ini(directory: Path, database_url: str, port: int) -> Path:
    """A transaction-pooling pgbouncer on 127.0.0.1:port in front of ``database_url``'s database
    (its Unix socket dir as ``host=`` for the embedded server)."""
    server = conninfo_to_dict(libpq_url(database_url))
    target = " ".join(f"{key}={server[name]}" for key, name in (
        ("host", "host"), ("port", "port"), ("dbname", "dbname"), ("user", "user"),
        ("password", "password")) if server.get(name))
    ini = directory / "pgbouncer.ini"
    ini.write_text(f"""[databases]
replyx = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
; psycopg and asyncpg send these at start-up; a pooler cannot keep per-session settings.
ignore_startup_parameters = extra_float_digits,options,statement_timeout
pidfile = {directory}/pgbouncer.pid
logfile = {directory}/pgbouncer.log
""")
    return ini


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    """A database of this test's own: `replyx check` counts the gateways LISTENing on it,
    and another module's stack on the shared test database would be counted too."""
    with new_database(database_url, "replyx_pgb") as url:
        schema.upgrade(url)
        yield url


@pytest.fixture
def pgbouncer(own_database: str) -> Iterator[str]:
    """A running pgbouncer in front of the test's own database; yields the URL clients use."""
    database_url = own_database
    assert Path(PGBOUNCER).exists(), "pgbouncer is not installed: apt-get install pgbouncer"
    # Its own directory under /tmp: as root it runs as nobody, who cannot enter pytest's.
    with tempfile.TemporaryDirectory(prefix="replyx-pgbouncer-") as name:
        yield from _pgbouncer(Path(name), database_url)


def _pgbouncer(directory: Path, database_url: str) -> Iterator[str]:
    port = free_port()
    ini = pgbouncer_ini(directory, database_url, port)
    argv = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root: it runs as the embedded server's own user, which
        # may enter that server's socket dir (nobody, for a server on TCP).
        directory.chmod(0o777)
        ini.chmod(0o644)
        user = "pgserver" if "host=/" in libpq_url(database_url) and _user_exists("pgserver") \
            else "nobody"
        argv = [PGBOUNCER, "-u", user, str(ini)]
    out = open(directory / "pgbouncer.out", "wb")  # closed below
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    user = conninfo_to_dict(libpq_url(database_url)).get("user") or "postgres"
    url = f"postgresql://{user}@127.0.0.1:{port}/replyx"
    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            assert proc.poll() is None and time.monotonic() < deadline, (
                (directory / "pgbouncer.out").read_text())
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)
    out.close()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.gen_test(timeout=240)
async def test_stack_through_pgbouncer_with_a_direct_listen_connection(
    tmp_path: Path, own_database: str, pgbouncer: str
) -> None:
    database_url = own_database
    tenant = create_tenant(database_url)
    stack = Stack(tmp_path / "stack", pgbouncer, REPLYX_LISTEN_DATABASE_URL=database_url)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: stack.start("--no-demo", "--no-nginx"))
    try:
        result = await loop.run_in_executor(None, stack.cli, "check", "--json")
        report = {c["name"]: c for c in orjson.loads(result.stdout)["checks"]}
        assert result.returncode == 0, report
        assert report["listen/notify"]["status"] == "pass"

        # The backend writes through pgbouncer; the gateway hears it on its own connection.
        api, sockets = Api(stack.api), Sockets(stack.ws)
        dialog_id, guest = await api.widget_dialog(tenant)
        clients = await open_three(sockets, tenant, dialog_id, guest)
        poster = site_poster(api, tenant, dialog_id, rate=30.0).start()
        await poster.wait_created(30)
        # The LISTEN session killed: the gateway re-LISTENs on the direct URL and catches up.
        with psycopg.connect(database_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'replyx-gateway-listener'"
                " AND datname = current_database()").fetchall()
        assert killed == [(True,)]
        await poster.wait_created(poster.created + 60)
        await poster.stop()
        assert all(status == 201 for status, _ in poster.results), poster.results
        await assert_match_database(database_url, dialog_id, clients, timeout=30)
        assert all(c.connects == 1 and c.close_codes == [] for c in clients)
        await sockets.close_all()

        # The LISTEN URL pointed at pgbouncer: the round trip fails and says why.
        env: dict[str, Any] = {**stack.env, "REPLYX_LISTEN_DATABASE_URL": pgbouncer}
        bad = await loop.run_in_executor(None, lambda: subprocess.run(
            [str(BIN / "replyx"), "check", "--json", "--timeout", "2"], env=env,
            capture_output=True, text=True, timeout=60, check=False))
        checks = {c["name"]: c for c in orjson.loads(bad.stdout)["checks"]}
        assert bad.returncode == 1
        assert checks["listen/notify"]["status"] == "fail", checks["listen/notify"]
        assert "REPLYX_LISTEN_DATABASE_URL" in checks["listen/notify"]["detail"]
        assert "pgbouncer" in checks["listen/notify"]["hint"]
    finally:
        await loop.run_in_executor(None, stack.stop)


@pytest.mark.gen_test(timeout=60)
async def test_shared_commits_through_pgbouncer(own_database: str, pgbouncer: str) -> None:
    """The backend's group commit (one pipelined transaction for the writes that waited)
    through a transaction pooler: committed in dialog order, and a refused batch still
    commits every write but the bad one."""
    with psycopg.connect(own_database, autocommit=True) as conn:
        conn.execute(group_commit_test.TABLE)
    pool = WritePool(libpq_url(pgbouncer), {"prepare_threshold": None}, 8)
    group = GroupCommit(pool)
    try:
        for run, values in (("pgb-ok", [0, 1, 2, 3]), ("pgb-refused", [0, -1, 2, 3])):
            slow = await group_commit_test.busy_lanes(group, 0.3)
            results = await asyncio.gather(
                *(group.fetchone(group_commit_test.INSERT, {"k": 2 - n % 2, "v": v, "run": run},
                                 2 - n % 2) for n, v in enumerate(values)),
                return_exceptions=True)
            await asyncio.gather(*slow)
            good = [(v,) for v in values if v >= 0]
            assert [r for r in results if not isinstance(r, Exception)] == good, results
            with psycopg.connect(own_database, autocommit=True) as conn:
                assert group_commit_test.stored(conn, run) == sorted(
                    ((2 - n % 2, v) for n, v in enumerate(values) if v >= 0),
                    key=lambda kv: kv[0])
    finally:
        await pool.close()
