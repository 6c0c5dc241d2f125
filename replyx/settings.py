"""Every setting, declared once: its attribute, environment variable, default, check and doc.

:class:`Settings` is the one typed object every process (CLI, backend workers,
gateway) reads its configuration from. Each field is declared with
:func:`setting`, which names the environment variable, parses and checks its
value, and documents it in one line; ``conf/replyx.env.example`` is generated
from these declarations (``python -m replyx.settings > conf/replyx.env.example``,
and a test keeps the two equal), and :meth:`Settings.to_environ` gives child
processes the same values back. A bad value stops the process at start with the
variable's name (never the value of a secret). Nothing here is read at import
time; tests pass an explicit mapping instead of touching ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from replyx.eventloop import LOOPS
from replyx.origins import normalize_origin

T = TypeVar("T")

#: HS256 keys shorter than this are refused: RFC 7518 asks for at least the hash size.
MIN_JWT_SECRET_BYTES = 32
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_DATA_DIR = Path("./var")


class ConfigError(Exception):
    """A setting is malformed; the message names the variable (never a secret's value)."""


# -- parsers: raw text → value, or ValueError with the reason ------------------------------


def _text(raw: str) -> str:
    return raw


def _path(raw: str) -> Path:
    return Path(raw).expanduser().absolute()


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number, 0-65535")
    return value


def _count(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _rate(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return value


def _bytes(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(f"must be at least {minimum} bytes")
        return value

    return parse


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _event_loop(raw: str) -> str:
    if raw not in LOOPS:
        raise ValueError(f"must be one of {', '.join(LOOPS)}")
    return raw


def _postgres_url(raw: str) -> str:
    scheme = urlsplit(raw).scheme.split("+", 1)[0]
    if scheme not in ("postgres", "postgresql"):
        raise ValueError("is not a postgresql:// URL")
    return raw


def _origin(raw: str) -> str:
    origin = normalize_origin(raw)
    if origin is None:
        raise ValueError("must be an origin, scheme://host[:port]")
    return origin


def _jwt_secret(raw: str) -> str:
    size = len(raw.encode())
    if size < MIN_JWT_SECRET_BYTES:
        raise ValueError(f"is {size} bytes; at least {MIN_JWT_SECRET_BYTES} are required")
    return raw


def setting(
    env: str,
    default: Any,
    parse: Callable[[str], Any],
    doc: str,
    *,
    section: str,
    secret: bool = False,
    example: str | None = None,
) -> Any:
    """Declare one setting (a dataclass field carrying its variable, parser and doc).

    :param example: what the example env file shows commented out, for settings with
        no useful default (a URL, a key).
    """
    return field(
        default=default,
        repr=not secret,
        metadata={"env": env, "parse": parse, "doc": doc, "section": section,
                  "secret": secret, "example": example},
    )


_DB = "Postgres"
_PLACES = "Where things are"
_SECURITY = "Credentials"
_LOGS = "Logs"
_LIMITS = "Gateway: limits per client"
_GATEWAY = "Gateway: the LISTEN connection and shutdown"
_BACKEND = "Backend"
_ANONYMOUS = "Backend: limits for callers without an operator login (kept in Postgres)"


@dataclass(frozen=True)
class Settings:
    """Configuration shared by the CLI, the backend and the gateway."""

    database_url: str | None = setting(
        "DATABASE_URL", None, _postgres_url,
        "Postgres. Unset: an embedded server under $REPLYX_DATA_DIR/pg (replyx run starts it).",
        section=_DB, secret=True, example="postgresql://replyx:CHANGE-ME@127.0.0.1:5432/replyx")
    listen_database_url: str | None = setting(
        "REPLYX_LISTEN_DATABASE_URL", None, _postgres_url,
        "The gateway's LISTEN connection, when DATABASE_URL cannot LISTEN (pgbouncer in"
        " transaction mode): a direct URL to the same database. Unset: DATABASE_URL.",
        section=_DB, secret=True, example="postgresql://replyx:CHANGE-ME@127.0.0.1:5432/replyx")
    data_dir: Path = setting(
        "REPLYX_DATA_DIR", DEFAULT_DATA_DIR, _path,
        "The embedded database, logs, the supervisor socket and generated keys.",
        section=_PLACES, example="./var")
    backend_port: int = setting("BACKEND_PORT", 8000, _port, "The backend (gunicorn).",
                                section=_PLACES)
    gateway_port: int = setting(
        "GATEWAY_PORT", 8001, _port,
        "The gateway; with REPLYX_GATEWAYS=N, gateways 1..N listen on GATEWAY_PORT..+N-1.",
        section=_PLACES)
    gateways: int = setting(
        "REPLYX_GATEWAYS", 1, _count,
        "Gateway processes `replyx run` starts (each with its own LISTEN connection, behind"
        " nginx's upstream): named gateway-1..N when over 1, else gateway.", section=_PLACES)
    gateway_instance: int = setting("REPLYX_GATEWAY_INSTANCE", 1, _count, "Which of the"
                                    " REPLYX_GATEWAYS this process is (supervisord sets it).",
                                    section=_PLACES)
    gateway_name_env: str | None = setting(
        "REPLYX_GATEWAY_NAME", None, _text,
        "The gateway's name in its log lines, metrics (replyx_gateway_info) and debug status."
        " Unset: gateway, or gateway-<instance> when REPLYX_GATEWAYS is over 1.",
        section=_PLACES, example="gateway-b")
    nginx_port: int = setting("NGINX_PORT", 8080, _port, "nginx, when it is installed.",
                              section=_PLACES)
    host: str = setting("REPLYX_HOST", "127.0.0.1", _text, "The interface all three listen on.",
                        section=_PLACES)
    event_loop: str = setting(
        "REPLYX_EVENT_LOOP", "uvloop", _event_loop,
        "The event loop of the gateway and the backend workers: asyncio or uvloop.",
        section=_PLACES)
    backend_workers: int = setting(
        "BACKEND_WORKERS", 4, _count, "gunicorn workers of the backend (replyx check expects"
        " this many).", section=_PLACES)

    jwt_secret_env: str | None = setting(
        "REPLYX_JWT_SECRET", None, _jwt_secret,
        "HS256 key for operator JWTs, at least 32 bytes. Unset: generated once into"
        " $REPLYX_DATA_DIR/jwt_secret (mode 0600); in production set it from a secret store.",
        section=_SECURITY, secret=True, example="")
    jwt_ttl_seconds: int = setting("REPLYX_JWT_TTL", 12 * 3600, _count,
                                   "Lifetime of issued operator tokens, in seconds.",
                                   section=_SECURITY)
    jwt_max_lifetime: int = setting(
        "REPLYX_JWT_MAX_LIFETIME", 7 * 24 * 3600, _count,
        "Operator tokens whose exp - iat is longer than this (seconds), or whose iat is in the"
        " future, are refused however they are signed.", section=_SECURITY)
    widget_origin: str | None = setting(
        "REPLYX_WIDGET_ORIGIN", None, _origin,
        "The origin that serves the widget iframe; only then is ?parent_origin= honoured.",
        section=_SECURITY, example="https://widget.replyx.example")

    log_level: str | None = setting(
        "REPLYX_LOG_LEVEL", None, _log_level,
        "DEBUG, INFO, WARNING, ERROR. Unset: INFO for the servers, WARNING for commands.",
        section=_LOGS, example="INFO")
    log_max_bytes: int = setting(
        "REPLYX_LOG_MAX_BYTES", 20 * 1024 * 1024, _bytes(1024),
        "$REPLYX_DATA_DIR/log/<program>.log is rotated at this size (bytes)…", section=_LOGS)
    log_backups: int = setting("REPLYX_LOG_BACKUPS", 5, _count, "…and this many old files kept.",
                               section=_LOGS)

    socket_buffer_limit: int = setting(
        "REPLYX_SOCKET_BUFFER", 1 << 20, _bytes(4096),
        "Per-socket write buffer (bytes) before a slow client is closed with 4008.",
        section=_LIMITS)
    slow_close_grace: float = setting(
        "REPLYX_SLOW_CLOSE_GRACE", 10.0, _seconds,
        "Seconds a socket may take to read a replay chunk before it is closed with 4008 too.",
        section=_LIMITS)
    max_inbound_frame: int = setting(
        "REPLYX_MAX_FRAME", 64 * 1024, _bytes(1024),
        "Largest inbound client frame (bytes); larger ones close the socket with 1009.",
        section=_LIMITS)
    client_msgs_per_second: float = setting(
        "REPLYX_CLIENT_RATE", 20.0, _rate,
        "Inbound client frames per second per socket (burst REPLYX_CLIENT_BURST), else 1008.",
        section=_LIMITS)
    client_burst: int = setting("REPLYX_CLIENT_BURST", 40, _count,
                                "Burst of inbound frames a socket may send at once.",
                                section=_LIMITS)
    max_sockets_per_ip: int = setting(
        "REPLYX_MAX_SOCKETS_PER_IP", 2000, _count,
        "Concurrent sockets per client address (X-Real-IP from a loopback nginx; an IPv6 /64"
        " counts as one).", section=_LIMITS)
    ping_interval: float = setting(
        "REPLYX_PING_INTERVAL", 20.0, _seconds,
        "WebSocket ping interval (seconds): finds idle and half-open clients…", section=_LIMITS)
    ping_timeout: float = setting("REPLYX_PING_TIMEOUT", 20.0, _seconds,
                                  "…and how long a pong may take (seconds).", section=_LIMITS)
    join_timeout: float = setting(
        "REPLYX_JOIN_TIMEOUT", 10.0, _seconds,
        "A new socket's authorisation must finish within this (seconds), else 1013.",
        section=_LIMITS)
    fragment_timeout: float = setting("REPLYX_FRAGMENT_TIMEOUT", 10.0, _seconds, "A fragmented"
        " client message must be finished within this (seconds), else 1008.", section=_LIMITS)
    handshake_rate: float = setting(
        "REPLYX_HANDSHAKE_RATE", 10.0, _rate, "Socket handshakes per second per client address"
        " (burst REPLYX_HANDSHAKE_BURST), else 1008; a direct caller on this host is not"
        " counted.", section=_LIMITS)
    handshake_burst: int = setting("REPLYX_HANDSHAKE_BURST", 60, _count, "…and how many at once.",
                                   section=_LIMITS)
    address_frame_rate: float = setting(
        "REPLYX_ADDRESS_FRAME_RATE", 200.0, _rate, "Inbound frames per second per client address"
        " across all its sockets (burst REPLYX_ADDRESS_FRAME_BURST); the socket that goes over"
        " is closed 1008.", section=_LIMITS)
    address_frame_burst: int = setting("REPLYX_ADDRESS_FRAME_BURST", 400, _count,
                                       "…and how many at once.", section=_LIMITS)
    replay_page_bytes: int = setting(
        "REPLYX_REPLAY_PAGE_BYTES", 1 << 20, _bytes(4096), "A replay (since=N) reads pages of at"
        " most this many bytes of frames (and 500 rows; at least one row)…", section=_LIMITS)
    replay_memory: int = setting(
        "REPLYX_REPLAY_MEMORY", 32 << 20, _bytes(4096), "…and all pages held at once share this"
        " many bytes (no room within REPLYX_JOIN_TIMEOUT: 1013).", section=_LIMITS)

    listener_probe_interval: float = setting(
        "REPLYX_PROBE_INTERVAL", 1.0, _seconds,
        "The LISTEN connection is probed every this many seconds…", section=_GATEWAY)
    listener_probe_timeout: float = setting(
        "REPLYX_PROBE_TIMEOUT", 2.0, _seconds, "…and must answer within this many.",
        section=_GATEWAY)
    listener_backoff_max: float = setting(
        "REPLYX_BACKOFF_MAX", 30.0, _seconds,
        "Longest wait between reconnect attempts of the LISTEN connection (seconds).",
        section=_GATEWAY)
    shutdown_grace: float = setting(
        "REPLYX_SHUTDOWN_GRACE", 5.0, _seconds,
        "On SIGTERM, how long sockets may take to answer their 1012 close (seconds).",
        section=_GATEWAY)

    login_max_failures: int = setting(
        "REPLYX_LOGIN_MAX_FAILURES", 10, _count,
        "Failed logins allowed per client address within REPLYX_LOGIN_WINDOW; then 429.",
        section=_BACKEND)
    login_window: float = setting("REPLYX_LOGIN_WINDOW", 300.0, _seconds,
                                  "The failed-login window (seconds).", section=_BACKEND)

    widget_dialog_rate: float = setting(
        "REPLYX_WIDGET_DIALOG_RATE", 0.5, _rate,
        "Widget dialogs a client address may create per second (burst"
        " REPLYX_WIDGET_DIALOG_BURST), else 429 with Retry-After. The address is X-Real-IP from"
        " a loopback nginx (an IPv6 /64 counts as one); a direct caller on this host (replyx"
        " check, the bench) is not counted per address.", section=_ANONYMOUS)
    widget_dialog_burst: int = setting("REPLYX_WIDGET_DIALOG_BURST", 30, _count,
                                       "…and how many at once.", section=_ANONYMOUS)
    address_write_rate: float = setting(
        "REPLYX_ADDRESS_WRITE_RATE", 5.0, _rate,
        "Widget and site message and typing POSTs per second per client address (burst"
        " REPLYX_ADDRESS_WRITE_BURST), else 429 with Retry-After…", section=_ANONYMOUS)
    address_write_burst: int = setting("REPLYX_ADDRESS_WRITE_BURST", 200, _count,
                                       "…and how many at once.", section=_ANONYMOUS)
    guest_write_rate: float = setting(
        "REPLYX_GUEST_WRITE_RATE", 1.0, _rate,
        "Widget message and typing POSTs per second per guest token (burst"
        " REPLYX_GUEST_WRITE_BURST), else 429 with Retry-After…", section=_ANONYMOUS)
    guest_write_burst: int = setting("REPLYX_GUEST_WRITE_BURST", 100, _count,
                                     "…and how many at once.", section=_ANONYMOUS)

    def __post_init__(self) -> None:
        # A relative data dir means "under the directory the process started in".
        object.__setattr__(self, "data_dir", self.data_dir.expanduser().absolute())
        if self.gateway_instance > self.gateways or self.gateway_port + self.gateways > 65536:
            raise ConfigError(f"REPLYX_GATEWAY_INSTANCE={self.gateway_instance}, REPLYX_GATEWAYS="
                              f"{self.gateways}, GATEWAY_PORT={self.gateway_port}: instance"
                              " over the count, or ports past 65535")
        if self.jwt_ttl_seconds > self.jwt_max_lifetime:
            raise ConfigError(
                f"REPLYX_JWT_TTL={self.jwt_ttl_seconds} is longer than"
                f" REPLYX_JWT_MAX_LIFETIME={self.jwt_max_lifetime}: issued tokens would be refused"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); empty means unset."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw.strip())
            except ValueError as exc:
                if f.metadata["secret"]:  # never echo a secret, even a malformed one
                    raise ConfigError(f"{name} {exc}") from None
                reason = str(exc)
                if reason.startswith(("invalid literal", "could not convert")):
                    reason = "must be a number"
                raise ConfigError(f"{name}={raw!r}: {reason}") from None
        return cls(**values)

    def to_environ(self) -> dict[str, str]:
        """The variables that give a child process these same settings."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[f.metadata["env"]] = str(value)
        return env

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
        callers (gunicorn workers booting together) all end up reading the same
        file. A key file that other users can read is refused, as ssh refuses a
        private key with loose permissions.
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
        # Another process may be between O_CREAT and the write: the key appears at once.
        for _ in range(50):
            if len(key) >= MIN_JWT_SECRET_BYTES:
                break
            time.sleep(0.01)
            key = path.read_text().strip().encode()
        if len(key) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(
                f"the JWT signing key from {path} is {len(key)} bytes;"
                f" at least {MIN_JWT_SECRET_BYTES} are required"
            )
        return key


def example_env() -> str:
    """``conf/replyx.env.example``: every setting with its doc and default, by section."""
    lines = [
        "# ReplyX realtime: every setting, with its default. Generated from replyx/settings.py:",
        "#   python -m replyx.settings > conf/replyx.env.example",
        "# Copy to .env and `set -a; . ./.env; set +a`. Every variable is optional.",
    ]
    section = None
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        if meta["section"] != section:
            section = meta["section"]
            lines += ["", f"# -- {section}"]
        lines += textwrap.wrap(meta["doc"], 96, initial_indent="# ", subsequent_indent="# ")
        if meta["example"] is not None:
            lines.append(f"# {meta['env']}={meta['example']}")
        else:
            default = f.default
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            lines.append(f"{meta['env']}={shown}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(example_env())
