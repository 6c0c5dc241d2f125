"""Where the database is: ``DATABASE_URL``, or an embedded Postgres under the data dir.

The embedded server uses the Postgres binaries shipped in the ``pgserver``
wheel, so a machine with no Postgres installed can run the whole stack. The
server listens on a Unix socket inside its data directory only (no TCP port
to collide with), is started on demand by whichever command needs it first,
and keeps running until ``replyx run`` that started it exits or someone
calls :meth:`EmbeddedPostgres.stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

DATABASE_NAME = "replyx"
# Postgres refuses to run as root; pgserver creates this unprivileged user for it.
_SYSTEM_USER = "pgserver"
_SOCKET_PATH_MAX = 100


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised or started."""


def _bin_dir() -> Path:
    # Importing pgserver probes XDG_RUNTIME_DIR and warns when it is unset; we never use that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _bin(name: str) -> str:
    return str(_bin_dir() / name)


class EmbeddedPostgres:
    """A Postgres cluster in ``<data_dir>/pg`` reachable over a Unix socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pg"
        self._run_as = _SYSTEM_USER if os.geteuid() == 0 else None

    # -- locations ---------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes; deep test directories overflow that.
        if len(os.fsencode(self.pgdata / ".s.PGSQL.5432")) <= _SOCKET_PATH_MAX:
            return self.pgdata
        digest = hashlib.sha256(os.fsencode(self.pgdata)).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"replyx-pg-{os.getuid()}-{digest}"

    @property
    def log_file(self) -> Path:
        return self.pgdata / "postgres.log"

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://postgres@/{database}?host={quote(str(self.socket_dir), safe='/')}"

    # -- lifecycle ---------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".pg.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        result = subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.pgdata), "status"],
            capture_output=True,
            user=self._run_as,
            check=False,
        )
        return result.returncode == 0

    def ensure_running(self) -> str:
        """Initialise the cluster if needed, start it if stopped; return its URL."""
        with self._lock():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if not self.is_running():
                self._start()
            self._ensure_database()
        return self.url()

    def start(self) -> None:
        with self._lock():
            if not self.is_running():
                self._start()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` rolls back open transactions and disconnects clients)."""
        with self._lock():
            if self.is_running():
                self._pg_ctl("-w", "-t", "60", "-m", mode, "stop")

    # -- internals ---------------------------------------------------------

    def _prepare_for_system_user(self) -> None:
        _bin_dir()  # imports pgserver quietly first
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(_SYSTEM_USER)
        ensure_prefix_permissions(self.pgdata)
        entry = pwd.getpwnam(_SYSTEM_USER)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        # The binaries must be reachable by that user too.
        ensure_prefix_permissions(_bin_dir())

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            self._prepare_for_system_user()
        log.info("initialising embedded Postgres in %s", self.pgdata)
        self._run(
            _bin("initdb"),
            "-D", str(self.pgdata),
            "--auth=trust", "--encoding=UTF8", "--locale=C", "-U", "postgres",
        )
        with open(self.pgdata / "postgresql.conf", "a") as fh:
            fh.write(
                "\n# ReplyX embedded defaults\n"
                "listen_addresses = ''\n"
                "max_connections = 300\n"
                "shared_buffers = 128MB\n"
                "timezone = 'UTC'\n"
                "log_line_prefix = '%m [%p] '\n"
            )
        if self._run_as:
            entry = pwd.getpwnam(_SYSTEM_USER)
            os.chown(self.pgdata / "postgresql.conf", entry.pw_uid, entry.pw_gid)

    def _start(self) -> None:
        socket_dir = self.socket_dir
        if socket_dir != self.pgdata:
            self._private_socket_dir(socket_dir)
        log.info("starting embedded Postgres (socket in %s)", socket_dir)
        try:
            self._pg_ctl(
                "-w", "-t", "60", "-l", str(self.log_file), "-o", f"-k {socket_dir}", "start"
            )
        except EmbeddedPostgresError as exc:
            tail = ""
            if self.log_file.exists():
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
            raise EmbeddedPostgresError(f"{exc}\n{tail}") from None

    def _private_socket_dir(self, path: Path) -> None:
        """Create (or accept) the socket directory in /tmp, private to the server.

        The cluster trusts every local connection, so whoever can reach the socket is a
        superuser: the directory must be ours, mode 0700, and not a planted symlink.
        """
        owner = pwd.getpwnam(self._run_as) if self._run_as else None
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = os.lstat(path)
        allowed = {os.getuid()} | ({owner.pw_uid} if owner else set())
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid not in allowed
            or info.st_mode & 0o077
        ):
            raise EmbeddedPostgresError(
                f"refusing socket directory {path}: not a private directory of this user"
            )
        if owner is not None and info.st_uid != owner.pw_uid:
            os.lchown(path, owner.pw_uid, owner.pw_gid)

    def _ensure_database(self) -> None:
        exists = self._run(
            _bin("psql"), "-XAtq", self.url("postgres"), "-c",
            "SELECT 1 FROM pg_database WHERE datname = 'replyx'",
        ).strip()
        if exists != "1":
            self._run(_bin("createdb"), "-h", str(self.socket_dir), "-U", "postgres", DATABASE_NAME)

    def _pg_ctl(self, *args: str) -> str:
        return self._run(_bin("pg_ctl"), "-D", str(self.pgdata), *args)

    def _run(self, *argv: str) -> str:
        # pg_ctl leaves the postmaster holding inherited pipes: capture through files instead.
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, text=True,
                user=self._run_as, check=False, cwd="/",
            )
            out.seek(0)
            output = out.read()
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{Path(argv[0]).name} failed with exit code {result.returncode}: {output.strip()}"
            )
        return output


def resolve_database_url(database_url: str | None, data_dir: Path) -> str:
    """``DATABASE_URL`` when given, else the embedded server's URL (started on demand)."""
    if database_url:
        return database_url
    return EmbeddedPostgres(data_dir).ensure_running()


def sqlalchemy_url(url: str, *, driver: str = "psycopg") -> str:
    """``postgresql://…`` → ``postgresql+psycopg://…`` for SQLAlchemy."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"not a Postgres URL (scheme {parts.scheme!r})")
    return urlunsplit(parts._replace(scheme=f"postgresql+{driver}"))


def libpq_url(url: str) -> str:
    """Strip any SQLAlchemy driver suffix: ``postgresql+psycopg://`` → ``postgresql://``."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit(parts._replace(scheme=scheme))


def with_database(url: str, name: str) -> str:
    """The same server's URL, for database ``name``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def redact_url(url: str) -> str:
    """The URL without its password, for log lines and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def psql_binary() -> str:
    """The system ``psql`` when installed, else the one bundled with the embedded server."""
    return shutil.which("psql") or _bin("psql")
