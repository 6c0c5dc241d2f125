"""The measured side: a fresh database, and the server processes started directly.

Each server is a process group of its own (gunicorn and its 4 workers, the
gateway, the naive gateway, uvicorn and its 4 workers), started with the file
descriptor limit raised to the hard limit, logging to ``<run dir>/log``, and
stopped with SIGTERM (then SIGKILL) to the whole group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg

from replyx import schema, security
from replyx.pg import EmbeddedPostgres, libpq_url, with_database
from replyx.protocol import NOTIFY_TRIGGERS
from replyx_ops.bench.load import raise_fd_limit

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class BenchDatabase:
    """A database of its own (``replyx_bench_<hex>``), on ``DATABASE_URL`` or embedded."""

    def __init__(self, server_url: str | None, data_dir: Path) -> None:
        self.embedded: EmbeddedPostgres | None = None
        self.started_embedded = False
        if server_url is None:
            self.embedded = EmbeddedPostgres(data_dir / "bench")
            self.started_embedded = not self.embedded.is_running()
            server_url = self.embedded.ensure_running()
        self.admin_url = with_database(libpq_url(server_url), "postgres")
        self.name = f"replyx_bench_{secrets.token_hex(4)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = with_database(self.admin_url, self.name)
        schema.upgrade(self.url)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def version(self) -> str:
        with self.connect() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def drop(self, keep: bool = False) -> None:
        """Drop the database (unless ``keep``), and stop the embedded server if we started it."""
        if not keep:
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.embedded is not None and self.started_embedded:
            self.embedded.stop()


class Tenant:
    """One operator and assistant, ``dialogs`` numbered by the database, their credentials."""

    ORIGIN = "https://bench.example"

    def __init__(self, db: BenchDatabase, jwt_secret: bytes) -> None:
        self.db = db
        self.site_token = security.new_site_token()
        with db.connect() as conn:
            self.user_id = _one(conn.execute(
                "INSERT INTO users (email, password_hash) VALUES (%s, %s) RETURNING id",
                ("bench@replyx.invalid", security.hash_password(secrets.token_urlsafe(16))),
            ))
            self.assistant_id = _one(conn.execute(
                "INSERT INTO assistants (user_id, name, domains, site_token_hash)"
                " VALUES (%s, 'Bench', %s, %s) RETURNING id",
                (self.user_id, [self.ORIGIN], security.token_hash(self.site_token)),
            ))
        self.operator_token = security.issue_operator_token(self.user_id, jwt_secret, 7 * 86400)
        self.guest_tokens: dict[int, str] = {}

    def add_dialogs(self, count: int, *, widget_share: float = 0.5) -> list[int]:
        """``count`` dialogs, every other one a widget dialog with a guest token."""
        rows: list[tuple[str, str | None, str | None]] = []
        every = round(1 / widget_share) if widget_share else 0
        for i in range(count):
            if every and i % every == 0:
                token = security.new_guest_token()
                rows.append(("widget", token, security.token_hash(token)))
            else:
                rows.append(("site", None, None))
        ids: list[int] = []
        with self.db.connect() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO dialogs (assistant_id, channel, guest_token_hash)"
                " VALUES (%s, %s, %s) RETURNING id",
                [(self.assistant_id, channel, token_hash) for channel, _, token_hash in rows],
                returning=True,
            )
            while True:
                ids.append(_one(cur))
                if not cur.nextset():
                    break
        for dialog_id, (_channel, guest_token, _hash) in zip(ids, rows, strict=True):
            if guest_token is not None:
                self.guest_tokens[dialog_id] = guest_token
        return ids

    # -- paths -------------------------------------------------------------------------

    def admin_path(self, dialog_id: int) -> str:
        return f"/ws/dialogs/{dialog_id}?token={self.operator_token}"

    def site_path(self, dialog_id: int) -> str:
        return f"/ws/site/dialogs/{dialog_id}?site_token={self.site_token}"

    def widget_path(self, dialog_id: int) -> str:
        return (
            f"/ws/widget/dialogs/{dialog_id}?assistant_id={self.assistant_id}"
            f"&guest_token={self.guest_tokens[dialog_id]}"
        )

    def post_path(self, dialog_id: int) -> str:
        return f"/api/site/dialogs/{dialog_id}/messages?site_token={self.site_token}"

    def pair(self, dialog_id: int) -> list[tuple[int, str, str | None]]:
        """The two sockets of a dialog: admin, and widget (widget dialogs) or site."""
        second: tuple[int, str, str | None]
        if dialog_id in self.guest_tokens:
            second = (dialog_id, self.widget_path(dialog_id), self.ORIGIN)
        else:
            second = (dialog_id, self.site_path(dialog_id), None)
        return [(dialog_id, self.admin_path(dialog_id), None), second]

    def last_seqs(self, dialog_ids: list[int]) -> dict[int, int]:
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT id, last_seq FROM dialogs WHERE id = ANY(%s)", (dialog_ids,)
            ).fetchall()
        return {int(r[0]): int(r[1]) for r in rows}


def notify_triggers(action: str) -> str:
    """``ENABLE`` or ``DISABLE`` ReplyX's NOTIFY triggers (the peer's turns publish their own)."""
    return "ALTER TABLE messages " + ", ".join(f"{action} TRIGGER {t}" for t in NOTIFY_TRIGGERS)


def _one(cur: Any) -> int:
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


class Server:
    """One server process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 health_url: str) -> None:
        self.name = name
        self.health_url = health_url
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=raise_fd_limit,
        )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.health_url, timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not healthy within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def processes(self) -> list[psutil.Process]:
        """The leader and its children (gunicorn's and uvicorn's workers)."""
        try:
            leader = psutil.Process(self.proc.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self, workers_only: bool = False) -> int:
        procs = self.processes()
        if workers_only and len(procs) > 1:
            procs = procs[1:]
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Workers that outlived their leader belong to the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def server_env(db_url: str, data_dir: Path, jwt_secret: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REPLYX_DATA_DIR": str(data_dir),
        "REPLYX_JWT_SECRET": jwt_secret,
        "REPLYX_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        # Every socket of the benchmark comes from 127.0.0.1.
        "REPLYX_MAX_SOCKETS_PER_IP": "1000000",
    }
    env.update(extra)
    return env


def start_backend(env: dict[str, str], port: int, log_dir: Path, workers: int = 4) -> Server:
    return Server(
        "backend",
        [str(BIN / "gunicorn"), "-c", str(ROOT / "conf" / "gunicorn.conf.py"),
         "backend.app:make_app()"],
        {**env, "BACKEND_PORT": str(port), "BACKEND_WORKERS": str(workers)},
        log_dir, f"http://127.0.0.1:{port}/health",
    )


def start_gateway(env: dict[str, str], port: int, log_dir: Path, *, naive: bool = False
                  ) -> Server:
    module = "replyx_ops.bench.naive" if naive else "ws_gateway"
    return Server(
        "gateway-naive" if naive else "gateway",
        [sys.executable, "-m", module],
        {**env, "GATEWAY_PORT": str(port)},
        log_dir, f"http://127.0.0.1:{port}/health",
    )


def start_peer(env: dict[str, str], port: int, log_dir: Path, workers: int = 4) -> Server:
    return Server(
        "peer",
        [str(BIN / "uvicorn"), "replyx_ops.bench.peers.starlette_broadcaster:app",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        env, log_dir, f"http://127.0.0.1:{port}/health",
    )
