"""The Python client stops when it is cancelled, even when news arrives at the same moment.

A caller that gives up on ``wait_until`` / ``wait_ready`` / ``connect`` (an
``asyncio.timeout``, a task cancelled at shutdown) must get CancelledError back.
Found by ``replyx chaos --minutes 10 --gateways 2 --seed 1127``: on Python 3.11,
``asyncio.wait_for`` returns the inner result instead of raising when the
cancellation and the change land in the same loop iteration; the soak's stop of a
busy subscriber then waited for ever.
"""

from __future__ import annotations

import asyncio

from replyx_client import DialogClient


def test_wait_until_cancelled_as_a_frame_arrives_is_cancelled() -> None:
    async def scenario() -> tuple[bool, bool]:
        client = DialogClient("ws://127.0.0.1:9/ws/site/dialogs/1?site_token=x")
        waiting = asyncio.ensure_future(client.wait_until(lambda: False, 60, "never"))
        await asyncio.sleep(0.05)  # it now waits for a change
        client._notify()  # a frame arrived…
        waiting.cancel()  # …in the same iteration as the caller gave up
        await asyncio.wait({waiting}, timeout=2)
        done, cancelled = waiting.done(), waiting.done() and waiting.cancelled()
        if not done:
            for _ in range(20):  # do not leave the swallowed waiter behind
                waiting.cancel()
                await asyncio.sleep(0.01)
                if waiting.done():
                    break
        return done, cancelled

    assert asyncio.run(scenario()) == (True, True)
