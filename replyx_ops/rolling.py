"""Several gateways on one host: ``replyx ctl restart gateway`` one at a time.

Invariant: at most one gateway is down at any moment, so at most its share of the
sockets (about 1/N) is closed with 1012 at once. Each restarted gateway must answer
``/health`` 200 before the next one stops; then the command waits (at most
:data:`SETTLE_SECONDS`) until the sockets it closed are back (the total over all gateways
is what it was), mostly on it, as nginx's ``least_conn`` sends reconnecting clients to the
emptiest gateway. Clients that retry
while their gateway is still down are sent to the others by nginx, and move a second
time when those restart: a client that waits out a restart (~2 s) before its first
retry after 1012 moves once.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Callable

import orjson

from replyx.gateways import gateway_names, gateway_ports
from replyx.settings import Settings

#: How long to wait after a restarted gateway is healthy for its sockets to come back.
SETTLE_SECONDS = 10.0
HEALTH_TIMEOUT = 60.0
RESTART_ARGS = (["restart", "gateway"], ["restart", "gateway:*"])


def supervisor_names(settings: Settings) -> list[str]:
    """supervisorctl's names of the gateways: ``gateway``, or ``gateway:gateway-1`` …"""
    names = gateway_names(settings)
    return names if settings.gateways == 1 else [f"gateway:{name}" for name in names]


def health(host: str, port: int, timeout: float = 2.0) -> dict[str, object] | None:
    """The gateway's ``/health`` body when it answers 200, else None."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as resp:
            body = orjson.loads(resp.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    return body if isinstance(body, dict) else None


def sockets(host: str, port: int) -> int:
    report = health(host, port)
    count = report.get("sockets") if report else None
    return count if isinstance(count, int) else 0


def rolling_restart(settings: Settings, ctl: Callable[[list[str]], int]) -> int:
    """Restart every gateway in turn; ``ctl`` runs supervisorctl with the given arguments."""
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host  # noqa: S104
    ports = gateway_ports(settings)
    names = supervisor_names(settings)
    for i, (name, port) in enumerate(zip(names, ports, strict=True), start=1):
        total = sum(sockets(host, p) for p in ports)
        note(f"restarting {name} ({i} of {len(names)}, :{port})")
        code = ctl(["restart", name])
        if code != 0:
            return code
        deadline = time.monotonic() + HEALTH_TIMEOUT
        # /health answers 200 only when the listener is up and nothing is catching up.
        while health(host, port) is None:
            if time.monotonic() > deadline:
                note(f"{name} is not healthy after {HEALTH_TIMEOUT:g}s: stopping here;"
                     f" see its log under {settings.log_dir}")
                return 1
            time.sleep(0.2)
        if i < len(names) and total:
            # Its sockets are back (on it, mostly: least_conn) before the next one closes its
            # own; else both waves would be reconnecting at once.
            settle = time.monotonic() + SETTLE_SECONDS
            while sum(sockets(host, p) for p in ports) < total and time.monotonic() < settle:
                time.sleep(0.2)
        note(f"{name} healthy with {sockets(host, port)} socket(s)")
    return 0


def note(message: str) -> None:
    print(f"replyx ctl: {message}", file=sys.stderr, flush=True)
