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


def test_close_during_the_connect_closes_the_connection_it_was_opening() -> None:
    """``close()`` while the handshake is under way: the connection that then opens is
    closed at once (the server sees EOF) and the client does not count as connected."""

    async def scenario() -> tuple[bool, int, int]:
        eof = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.3)  # a slow answer: the client closes meanwhile
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                         b'data: {"type":"ready","dialog_id":1,"last_seq":0}\n\n')
            await writer.drain()
            await reader.read()  # until the client hangs up
            eof.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = DialogClient(f"ws://127.0.0.1:{port}/ws/site/dialogs/1?site_token=x",
                              transport="sse")
        opening = asyncio.ensure_future(client.connect(timeout=10))
        await asyncio.sleep(0.1)  # the request is sent; the answer has not come
        await client.close()
        closed_at_once = False
        try:
            await asyncio.wait_for(eof.wait(), 2)
            closed_at_once = True
        except TimeoutError:
            pass
        opening.cancel()
        await asyncio.wait({opening}, timeout=1)
        server.close()
        return closed_at_once, client.connects, len(client.close_codes)

    closed_at_once, connects, closes = asyncio.run(scenario())
    assert closed_at_once
    assert connects == closes  # not connected
