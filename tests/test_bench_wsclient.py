"""The bench's socket takes each frame's arrival time from the kernel, not from its own loop.

One load-generator process reads hundreds of sockets; a frame that waits while the
process reads others (or while it is descheduled) is late only in the load generator.
``arrival_ms`` must not include that wait, ``latencies_ms`` does: here the client's
loop is blocked for 300 ms while a frame arrives, on a real loopback connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from replyx_ops.bench.wsclient import Recorder, open_socket

BLOCKED_S = 0.3


def _frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


def _server(listener: socket.socket, go: threading.Event, sent: list[float]) -> None:
    conn, _ = listener.accept()
    with conn:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n" + _frame(b'{"type":"ready","last_seq":0}'))
        go.wait(5)
        time.sleep(0.05)  # well inside the client's blocked stretch
        stamp = time.time()
        conn.sendall(_frame(b'{"type":"message","seq":1,"text":"t=%r"}' % stamp))
        sent.append(stamp)
        time.sleep(1.0)


def test_a_frame_that_arrives_while_the_client_is_busy_counts_from_its_arrival() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    go, sent = threading.Event(), []
    thread = threading.Thread(target=_server, args=(listener, go, sent), daemon=True)
    thread.start()

    async def client() -> Recorder:
        recorder = Recorder()
        sock = await open_socket("127.0.0.1", listener.getsockname()[1], "/ws/x", None,
                                 "g", 1, recorder)
        recorder.start(True)
        go.set()
        time.sleep(BLOCKED_S)  # noqa: ASYNC251 (the point: the loop reads nothing, the frame waits)
        await recorder.wait_change(2.0)
        sock.close()
        return recorder

    recorder = asyncio.run(client())
    thread.join(5)
    listener.close()
    assert sent and len(recorder.latencies_ms) == 1 and len(recorder.arrival_ms) == 1
    read_ms, arrival_ms = recorder.latencies_ms[0], recorder.arrival_ms[0]
    # Read after the block (about 250 ms after it was sent); arrived at once.
    assert read_ms > 200, read_ms
    assert 0 <= arrival_ms < 50, arrival_ms
