"""The listener's watch loop, with a stand-in connection (a pure unit).

The real faults are in ``test_faults.py``; this pins down one that happens there only
by chance: the server ending the session in the middle of a probe.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ws_gateway.listener import Listener


class DyingConnection:
    """Answers the probe the way asyncpg sometimes does when the server has just ended the
    session (seen with ``pg_terminate_backend`` against the shared server)."""

    def is_closed(self) -> bool:
        return False

    async def fetchval(self, query: str) -> object:
        raise asyncpg.exceptions.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )


@pytest.mark.gen_test(timeout=10)
async def test_any_probe_failure_means_the_connection_is_lost() -> None:
    listener = Listener("postgresql://unused", "replyx_events", print, print,
                        probe_interval=0.01)
    listener._conn = DyingConnection()  # type: ignore[assignment]
    reason = await listener._watch()
    assert reason.startswith("probe failed: InternalClientError: cannot switch to state 12")


class TerminatedConnection(DyingConnection):
    """The same failed probe, and then the end of the session reaches asyncpg."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    async def fetchval(self, query: str) -> object:
        asyncio.get_running_loop().call_later(0.01, self.listener._lost.set)
        return await super().fetchval(query)


@pytest.mark.gen_test(timeout=10)
async def test_a_probe_that_fails_as_the_server_ends_the_session_names_the_end() -> None:
    """The log line operators grep for (``LISTEN connection lost: connection closed by the
    server``) is what a pg_terminate_backend gives, even when it lands on a probe."""
    listener = Listener("postgresql://unused", "replyx_events", print, print,
                        probe_interval=0.01)
    listener._conn = TerminatedConnection(listener)  # type: ignore[assignment]
    assert await listener._watch() == "connection closed by the server"
