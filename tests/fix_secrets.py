"""Every secret the suite hands out, and the check that none of them reached a log.

Helpers that issue credentials (``create_tenant``, ``Api.request``, ``Stack.cli``,
the tests' own short-lived tokens) :func:`remember` them; every real stack's data
dir is watched (:func:`watch_dir`); every log record this process emits is kept.
When the session ends, :func:`secrets_never_logged` looks for each remembered
secret, and for anything shaped like one of our tokens, in:

* the in-process log records (backend and gateway started by fixtures);
* every ``*.log`` file under a watched dir: backend (gunicorn), gateway,
  supervisord, nginx access and error logs, the embedded Postgres' log;
* the stderr notes of ``replyx run`` (its banner deliberately prints the demo
  tenant's tokens for wscat and curl: those are remembered, not scanned).

A hit fails the session (an error at teardown of the last test). The registry is
a module-level object on purpose: credentials are issued in plain helper
functions, not only in fixtures, and all of them must feed the one list.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

# Shapes of our credentials: site and guest tokens, and JWTs (base64url of '{"').
TOKEN_SHAPES = re.compile(
    r"rx[sg]_[A-Za-z0-9_-]{16,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
)
# Shorter values (a test's "wrong" password) would match innocent text.
MIN_SECRET_CHARS = 8


class _KeepRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must not break the test that logged it
            self.handleError(record)


@dataclass
class Leak:
    source: str
    line: int
    what: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.what}: {self.excerpt}"


@dataclass
class SecretRegistry:
    secrets: dict[str, str] = field(default_factory=dict)
    dirs: list[Path] = field(default_factory=list)
    records: _KeepRecords = field(default_factory=_KeepRecords)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def remember(self, value: object, what: str) -> None:
        if isinstance(value, str) and len(value) >= MIN_SECRET_CHARS:
            self.secrets.setdefault(value, what)

    def watch_dir(self, path: Path) -> None:
        if path not in self.dirs:
            self.dirs.append(path)

    def keep_logs_of(self, path: Path) -> None:
        """Read the logs under a watched dir now, because the dir is about to be deleted."""
        for source, text in self._dir_sources(path):
            self.kept.append((source, text))
        if path in self.dirs:
            self.dirs.remove(path)

    # -- where logs are --------------------------------------------------------

    def _collect_printed_secrets(self) -> None:
        """Remember what `replyx run` printed or saved for its demo tenant."""
        for directory in self.dirs:
            demo = directory / "demo.json"
            if demo.exists():
                saved = orjson.loads(demo.read_bytes())
                for key in ("password", "site_token", "guest_token"):
                    self.remember(saved.get(key), f"demo tenant {key}")
            run_out = directory / "replyx-run.out"
            if run_out.exists():
                for match in TOKEN_SHAPES.finditer(run_out.read_text(errors="replace")):
                    self.remember(match.group(), "token printed in the replyx run banner")
            key_file = directory / "jwt_secret"
            if key_file.exists():
                self.remember(key_file.read_text().strip(), "generated JWT key")

    def sources(self) -> Iterator[tuple[str, str]]:
        yield "in-process log records", "\n".join(self.records.lines)
        yield from self.kept
        for directory in self.dirs:
            yield from self._dir_sources(directory)

    @staticmethod
    def _dir_sources(directory: Path) -> Iterator[tuple[str, str]]:
        if directory.exists():
            for path in sorted(directory.rglob("*.log")):
                if path.is_file():
                    yield str(path), path.read_text(errors="replace")
            run_out = directory / "replyx-run.out"
            if run_out.exists():
                notes = [
                    line if line.startswith("replyx run:") else ""
                    for line in run_out.read_text(errors="replace").splitlines()
                ]
                yield str(run_out) + " (stderr notes)", "\n".join(notes)

    # -- the check ---------------------------------------------------------------

    def leaks(self) -> list[Leak]:
        self._collect_printed_secrets()
        found: list[Leak] = []
        for source, text in self.sources():
            for match in TOKEN_SHAPES.finditer(text):
                found.append(self._leak(source, text, match.start(), "a token-shaped value"))
            for secret, what in self.secrets.items():
                start = text.find(secret)
                if start >= 0:
                    found.append(self._leak(source, text, start, what))
        return found

    @staticmethod
    def _leak(source: str, text: str, start: int, what: str) -> Leak:
        line_no = text.count("\n", 0, start) + 1
        line_start = text.rfind("\n", 0, start) + 1
        # Enough to find the line, not enough to reuse the secret.
        excerpt = text[max(line_start, start - 60):start] + text[start:start + 6] + "…"
        return Leak(source, line_no, what, excerpt)


REGISTRY = SecretRegistry()


def remember(value: object, what: str) -> None:
    """Register an issued secret: it must never appear in any log."""
    REGISTRY.remember(value, what)


def watch_dir(path: Path) -> None:
    """Scan the ``*.log`` files under ``path`` when the session ends."""
    REGISTRY.watch_dir(path)


def keep_logs_of(path: Path) -> None:
    """Read a watched dir's logs now, before it is deleted."""
    REGISTRY.keep_logs_of(path)


def _ensure_handler() -> None:
    root = logging.getLogger()
    if REGISTRY.records not in root.handlers:
        root.addHandler(REGISTRY.records)


@pytest.fixture(scope="session", autouse=True)
def secrets_never_logged() -> Iterator[SecretRegistry]:
    """Keep every log record of the session; at its end, fail if any holds a secret."""
    root = logging.getLogger()
    previous = root.level
    if previous > logging.INFO:
        # INFO is what the stack logs at: connect, refuse and broadcast lines included.
        root.setLevel(logging.INFO)
    _ensure_handler()
    yield REGISTRY
    root.removeHandler(REGISTRY.records)
    root.setLevel(previous)
    leaks = REGISTRY.leaks()
    if leaks:
        listing = "\n".join(f"  {leak}" for leak in leaks[:50])
        pytest.fail(f"{len(leaks)} secret(s) found in logs:\n{listing}", pytrace=False)


@pytest.fixture(autouse=True)
def _keep_log_handler() -> Iterator[None]:
    # logs.setup_logging() replaces the root handlers; a test that calls it in-process
    # must not switch the scan off for the rest of the session.
    _ensure_handler()
    yield
    _ensure_handler()
