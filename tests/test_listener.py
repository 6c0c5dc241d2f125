"""The listener's watch loop, with a stand-in connection (a pure unit).

The real faults are in ``test_faults.py``; this pins down one that happens there only
by chance: the server ending the session in the middle of a probe.
"""

from __future__ import annotations

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
