"""Where a stack lives: its data dir, the lock ``replyx run`` holds, and what it runs on.

``replyx run`` holds an exclusive ``flock`` on ``$REPLYX_DATA_DIR/stack.lock`` for
as long as it runs, and writes what it runs on (ports, host, database, front door)
to ``stack.json`` beside it (mode 0600: the database URL may carry a password).
The lock, not the file, says whether a stack runs: a ``replyx run`` killed with
SIGKILL leaves a stale file behind, and its lock goes with the process.

Other commands use this to find the stack instead of guessing: the data dir of
the current directory (``./var``) or, when that holds nothing, the checkout's
``var/`` (``make run`` keeps its stack there); a running stack's state fills in
the settings the environment left at their defaults. Nothing here creates a
database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from replyx.pg import redact_url
from replyx.settings import DEFAULT_DATA_DIR, Settings

#: The checkout (or installed tree) this package lives in; ``make run`` uses its var/.
CHECKOUT = Path(__file__).resolve().parents[1]
LOCK_FILE = "stack.lock"
STATE_FILE = "stack.json"


@dataclass(frozen=True)
class StackState:
    """What a running ``replyx run`` started, as its ``stack.json`` records it."""

    pid: int
    data_dir: str
    host: str
    backend_port: int
    gateway_port: int
    nginx_port: int
    #: ``nginx``, ``proxy`` (the Python stand-in) or ``none``: what serves NGINX_PORT.
    front: str
    #: ``DATABASE_URL`` of the stack; None for the embedded server under ``data_dir``.
    database_url: str | None
    #: REPLYX_GATEWAYS: gateway processes on ``gateway_port``..+N-1.
    gateways: int = 1

    @classmethod
    def of(cls, settings: Settings, front: str) -> StackState:
        return cls(
            pid=os.getpid(), data_dir=str(settings.data_dir), host=settings.host,
            backend_port=settings.backend_port, gateway_port=settings.gateway_port,
            nginx_port=settings.nginx_port, front=front, database_url=settings.database_url,
            gateways=settings.gateways,
        )

    def where(self) -> str:
        """One line for people: pid, data dir and the URLs it serves."""
        host = self.host
        parts = [f"pid {self.pid}", f"data dir {self.data_dir}",
                 f"backend http://{host}:{self.backend_port}",
                 f"gateway ws://{host}:{self.gateway_port}"
                 + (f"..{self.gateway_port + self.gateways - 1}" if self.gateways > 1 else "")]
        if self.front != "none":
            parts.append(f"{self.front} http://{host}:{self.nginx_port}")
        url = self.database_url
        parts.append(f"database {redact_url(url) if url else 'embedded'}")
        return ", ".join(parts)


class StackRunningError(Exception):
    """``replyx run`` found another stack on the same data dir."""

    def __init__(self, state: StackState | None, data_dir: Path) -> None:
        where = state.where() if state else f"data dir {data_dir}"
        super().__init__(f"a stack is already running ({where})")
        self.state = state


def _read_state(data_dir: Path) -> StackState | None:
    try:
        raw = orjson.loads((data_dir / STATE_FILE).read_bytes())
        return StackState(**raw)
    except (OSError, orjson.JSONDecodeError, TypeError):
        return None


def _lock_held(path: Path) -> bool:
    """True when another process holds the lock file (this one takes nothing)."""
    try:
        fh = open(path, "rb")  # closed below, on every path
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def running(data_dir: Path) -> StackState | None:
    """The state of the ``replyx run`` running on ``data_dir``, or None."""
    if not _lock_held(data_dir / LOCK_FILE):
        return None
    state = _read_state(data_dir)
    # Started a moment ago and not written yet: still a running stack.
    return state or StackState(0, str(data_dir), "?", 0, 0, 0, "none", None)


class RunLock:
    """The lock ``replyx run`` holds for its whole life, and the state file it writes."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._fh: IO[bytes] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StackRunningError` naming the running stack."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.data_dir / LOCK_FILE, "ab")  # held until release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StackRunningError(_read_state(self.data_dir), self.data_dir) from None
        self._fh = fh

    def write(self, state: StackState) -> None:
        path = self.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(dataclasses.asdict(state), option=orjson.OPT_INDENT_2))
        tmp.replace(path)

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / STATE_FILE).unlink()
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


# -- finding the stack from another command ----------------------------------------------


def candidates(settings: Settings) -> list[Path]:
    """Data dirs to look in: the configured one; with the default, the checkout's var/ too."""
    dirs = [settings.data_dir]
    if settings.data_dir == DEFAULT_DATA_DIR.absolute():
        checkout_var = CHECKOUT / "var"
        if checkout_var != settings.data_dir:
            dirs.append(checkout_var)
    return dirs


def holds_a_stack(data_dir: Path) -> bool:
    """Whether ``replyx run`` (or ``replyx migrate``) ever used this data dir."""
    return any(
        (data_dir / name).exists() for name in (LOCK_FILE, "jwt_secret", "pg/PG_VERSION")
    )


def find_data_dir(settings: Settings) -> Path | None:
    """The data dir of a running stack, else of one that ran, else None."""
    dirs = candidates(settings)
    for data_dir in dirs:
        if running(data_dir) is not None:
            return data_dir
    return next((d for d in dirs if holds_a_stack(d)), None)


def not_found_message(settings: Settings) -> str:
    looked = " or ".join(str(d) for d in candidates(settings))
    return (f"no ReplyX stack found (looked in {looked}): start one with `replyx run`,"
            " or point REPLYX_DATA_DIR at its data dir")


def located(settings: Settings) -> Settings:
    """``settings`` for the stack found on this machine (see the module doc).

    The data dir becomes the one found; a running stack's host, ports and database
    replace those the environment left at their defaults. Unchanged when no stack is
    found: the caller decides whether that is an error.
    """
    data_dir = find_data_dir(settings)
    if data_dir is None:
        return settings
    found = dataclasses.replace(settings, data_dir=data_dir)
    state = running(data_dir)
    if state is None or not state.pid:
        return found
    defaults = Settings()
    changes: dict[str, Any] = {}
    for name in ("host", "backend_port", "gateway_port", "nginx_port", "database_url",
                 "gateways"):
        if getattr(settings, name) == getattr(defaults, name):
            changes[name] = getattr(state, name)
    return dataclasses.replace(found, **changes)
