"""What every check shares: its result, its failure, the probe's state and small helpers."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import psycopg

from replyx.gateways import gateway_names, gateway_ports
from replyx.pg import libpq_url
from replyx.settings import Settings

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    hint: str = ""


class CheckFailed(Exception):
    """A check found a problem: ``str(exc)`` says what, ``hint`` how to fix it."""

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.hint = hint


class Probe:
    """The state the checks share; each concern (postgres, processes, http) adds its checks."""

    def __init__(self, settings: Settings, *, nginx: bool | None, timeout: float) -> None:
        self.settings = settings
        self.nginx = nginx
        self.timeout = timeout
        host = settings.host
        # A wildcard bind address is reached through loopback.
        self.host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104
        self.backend = f"http://{self.host}:{settings.backend_port}"
        self.gateway = f"http://{self.host}:{settings.gateway_port}"
        #: Every gateway of this host (REPLYX_GATEWAYS): its name and base URL.
        self.gateways = [(name, f"http://{self.host}:{port}") for name, port
                         in zip(gateway_names(settings), gateway_ports(settings), strict=True)]
        self.proxy = f"http://{self.host}:{settings.nginx_port}"
        self.log_dir = settings.log_dir
        self.url: str | None = None
        self._supervisor: dict[str, dict[str, Any]] | None = None
        self._supervisor_configs: dict[str, dict[str, Any]] = {}
        self._supervisor_error = ""
        self._listeners: dict[int, set[int]] | None = None

    def _one(self, name: str, check: Callable[[], str]) -> Generator[Result, None, bool]:
        """Run one check; yield its result and return whether it passed."""
        try:
            detail = check()
        except CheckFailed as exc:
            yield Result(name, FAIL, str(exc), exc.hint)
            return False
        except Exception as exc:
            yield Result(name, FAIL, f"{type(exc).__name__}: {short(exc)}")
            return False
        yield Result(name, PASS, detail)
        return True

    def _connect(self, **kwargs: Any) -> Any:
        """A psycopg connection (typed loosely: the checks index rows they know exist)."""
        assert self.url is not None
        return psycopg.connect(
            libpq_url(self.url), connect_timeout=max(1, int(self.timeout)),
            application_name="replyx-check", **kwargs,
        )

    def _get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()


def short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket error
    if isinstance(reason, BaseException):
        exc = reason
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def short_body(body: bytes) -> str:
    return " ".join(body.decode(errors="replace").split())[:160]


def ms(value: float | None) -> str:
    return "- (no message yet)" if value is None else f"{value} ms"

