"""One typed settings object, read once from the environment.

Every process (CLI, backend workers, gateway) builds :class:`Settings` with
:meth:`Settings.from_environ`; tests pass an explicit mapping instead of
touching ``os.environ``. Nothing here is read at import time.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from replyx.origins import normalize_origin

T = TypeVar("T")

#: HS256 keys shorter than this are refused: RFC 7518 asks for at least the hash size.
MIN_JWT_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def _cast(environ: Mapping[str, str], key: str, cast: Callable[[str], T], default: T) -> T:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {cast.__name__}") from None


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


_positive.__name__ = "positive integer"  # how _cast's error message names it


@dataclass(frozen=True)
class Settings:
    """Configuration shared by the CLI, the backend and the gateway."""

    data_dir: Path
    database_url: str | None = None
    # The gateway's LISTEN connection, when it must bypass what DATABASE_URL points at
    # (a transaction-mode pgbouncer cannot LISTEN). Default: DATABASE_URL.
    listen_database_url: str | None = None
    backend_port: int = 8000
    gateway_port: int = 8001
    nginx_port: int = 8080
    host: str = "127.0.0.1"
    jwt_secret_env: str | None = field(default=None, repr=False)
    jwt_ttl_seconds: int = 12 * 3600
    widget_origin: str | None = None
    log_level: str = "INFO"
    # Processes: gunicorn workers of the backend; rotation of the logs under log_dir.
    backend_workers: int = 4
    log_max_bytes: int = 20 * 1024 * 1024
    log_backups: int = 5

    # Gateway tunables.
    listener_probe_interval: float = 1.0
    listener_probe_timeout: float = 2.0
    listener_backoff_max: float = 30.0
    socket_buffer_limit: int = 1 << 20
    slow_close_grace: float = 10.0
    max_inbound_frame: int = 64 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    client_msgs_per_second: float = 20.0
    client_burst: int = 40
    max_sockets_per_ip: int = 2000
    shutdown_grace: float = 5.0
    # Authorisation plus replay of a new socket; past it: 1013, try again.
    join_timeout: float = 10.0

    # Backend: failed logins allowed per client address in one window (seconds).
    login_max_failures: int = 10
    login_window: float = 300.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("REPLYX_DATA_DIR") or "./var").expanduser().absolute()
        kwargs: dict[str, Any] = {
            "data_dir": data_dir,
            "database_url": env.get("DATABASE_URL") or None,
            "listen_database_url": env.get("REPLYX_LISTEN_DATABASE_URL") or None,
            "backend_port": _cast(env, "BACKEND_PORT", _port, 8000),
            "gateway_port": _cast(env, "GATEWAY_PORT", _port, 8001),
            "nginx_port": _cast(env, "NGINX_PORT", _port, 8080),
            "host": env.get("REPLYX_HOST") or "127.0.0.1",
            "jwt_secret_env": env.get("REPLYX_JWT_SECRET") or None,
            "jwt_ttl_seconds": _cast(env, "REPLYX_JWT_TTL", int, 12 * 3600),
            "widget_origin": env.get("REPLYX_WIDGET_ORIGIN") or None,
            "log_level": (env.get("REPLYX_LOG_LEVEL") or "INFO").upper(),
            "backend_workers": _cast(env, "BACKEND_WORKERS", _positive, 4),
            "log_max_bytes": _cast(env, "REPLYX_LOG_MAX_BYTES", _positive, 20 * 1024 * 1024),
            "log_backups": _cast(env, "REPLYX_LOG_BACKUPS", _positive, 5),
            "listener_probe_interval": _cast(env, "REPLYX_PROBE_INTERVAL", float, 1.0),
            "listener_probe_timeout": _cast(env, "REPLYX_PROBE_TIMEOUT", float, 2.0),
            "listener_backoff_max": _cast(env, "REPLYX_BACKOFF_MAX", float, 30.0),
            "socket_buffer_limit": _cast(env, "REPLYX_SOCKET_BUFFER", int, 1 << 20),
            "slow_close_grace": _cast(env, "REPLYX_SLOW_CLOSE_GRACE", float, 10.0),
            "max_inbound_frame": _cast(env, "REPLYX_MAX_FRAME", int, 64 * 1024),
            "ping_interval": _cast(env, "REPLYX_PING_INTERVAL", float, 20.0),
            "ping_timeout": _cast(env, "REPLYX_PING_TIMEOUT", float, 20.0),
            "client_msgs_per_second": _cast(env, "REPLYX_CLIENT_RATE", float, 20.0),
            "client_burst": _cast(env, "REPLYX_CLIENT_BURST", int, 40),
            "max_sockets_per_ip": _cast(env, "REPLYX_MAX_SOCKETS_PER_IP", int, 2000),
            "shutdown_grace": _cast(env, "REPLYX_SHUTDOWN_GRACE", float, 5.0),
            "join_timeout": _cast(env, "REPLYX_JOIN_TIMEOUT", float, 10.0),
            "login_max_failures": _cast(env, "REPLYX_LOGIN_MAX_FAILURES", int, 10),
            "login_window": _cast(env, "REPLYX_LOGIN_WINDOW", float, 300.0),
        }
        settings = cls(**kwargs)
        if settings.login_max_failures < 1 or settings.login_window <= 0:
            raise ConfigError(
                "REPLYX_LOGIN_MAX_FAILURES must be at least 1 and REPLYX_LOGIN_WINDOW positive"
            )
        if settings.jwt_secret_env is not None:
            _check_secret(settings.jwt_secret_env.encode(), "REPLYX_JWT_SECRET")
        if settings.widget_origin is not None:

            normalized = normalize_origin(settings.widget_origin)
            if normalized is None:
                raise ConfigError(
                    f"REPLYX_WIDGET_ORIGIN={settings.widget_origin!r} is not an origin"
                    " (scheme://host[:port])"
                )
            object.__setattr__(settings, "widget_origin", normalized)
        return settings

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def backend_metrics_dir(self) -> Path:
        """``PROMETHEUS_MULTIPROC_DIR`` of the backend: one file per gunicorn worker."""
        return self.data_dir / "metrics" / "backend"

    @property
    def supervisor_socket(self) -> Path:
        return self.data_dir / "supervisor.sock"

    def jwt_secret(self) -> bytes:
        """The HS256 signing key: ``REPLYX_JWT_SECRET`` or a key kept under the data dir.

        The generated key is created once with mode 0600; concurrent first
        callers (four gunicorn workers booting together) all end up reading
        the same file. A key file that other users can read is refused, as
        ssh refuses a private key with loose permissions.
        """
        if self.jwt_secret_env is not None:
            return self.jwt_secret_env.encode()
        path = self.data_dir / "jwt_secret"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"the JWT signing key {path} is readable by other users (mode {mode:o});"
                f" run `chmod 600 {path}`"
            )
        key = path.read_text().strip().encode()
        if len(key) < MIN_JWT_SECRET_BYTES:
            # Another process may be between O_CREAT and the write: the key appears at once.

            for _ in range(50):
                time.sleep(0.01)
                key = path.read_text().strip().encode()
                if len(key) >= MIN_JWT_SECRET_BYTES:
                    break
        _check_secret(key, str(path))
        return key


def _check_secret(key: bytes, source: str) -> None:
    if len(key) < MIN_JWT_SECRET_BYTES:
        raise ConfigError(
            f"the JWT signing key from {source} is {len(key)} bytes;"
            f" at least {MIN_JWT_SECRET_BYTES} are required"
        )
