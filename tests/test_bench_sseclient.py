"""The bench's SSE stream counts exactly as its WebSocket twin does.

``replyx bench`` reports SSE losses, duplicates and gaps next to the sockets'; these
feed the gateway's event-stream bytes (split anywhere, as TCP may) into the
stream and check what it counted: the ``ready`` point, every message once, a
repeated ``seq`` as a duplicate, a skipped one as a gap, an ``id:`` that is not the
``seq`` as a gap (a browser would resume from it), ``event: close`` as the close code.
"""

from __future__ import annotations

import asyncio

import pytest

from replyx_ops.bench.sseclient import SseStream, as_sse, sse_path
from replyx_ops.bench.wsclient import HandshakeError, Recorder

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
        b"Connection: close\r\n\r\nretry: 1000\n\n")


class FakeTransport:
    def __init__(self, protocol: SseStream) -> None:
        self.protocol = protocol
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        raise AssertionError("an event stream sends nothing after its request")

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.protocol.connection_lost(None)


def message(seq: int, event_id: int | None = None) -> bytes:
    head = b"" if event_id == -1 else b"id: %d\n" % (seq if event_id is None else event_id)
    return head + b'data: {"type":"message","seq":%d,"text":"t=1.5"}\n\n' % seq


def feed(body: bytes, split: int = 7) -> tuple[SseStream, Recorder]:
    """The stream after ``body`` arrived in ``split``-byte pieces."""

    async def run() -> tuple[SseStream, Recorder]:
        recorder = Recorder()
        stream = SseStream("g", 7, recorder)
        stream.connection_made(FakeTransport(stream))  # type: ignore[arg-type]
        for i in range(0, len(body), split):
            stream.data_received(body[i:i + split])
        return stream, recorder

    return asyncio.run(run())


@pytest.mark.parametrize("split", [1, 7, 4096])
def test_counts_messages_from_ready_on_like_a_socket(split: int) -> None:
    body = (HEAD + b'id: 3\ndata: {"type":"ready","last_seq":3}\n\n' + b": keep-alive\n\n"
            + message(4) + b'data: {"type":"typing","role":"guest"}\n\n' + message(5)
            + message(5) + message(7) + message(8))
    stream, recorder = feed(body, split)
    assert stream.ready.result() == 3
    assert stream.start_seq == 3 and stream.last_seq == 8
    assert stream.received == 4  # 4, 5, 7, 8
    assert stream.duplicates == 1  # 5 again
    assert stream.gaps == 1  # 6 skipped
    assert recorder.frames == 4
    assert not stream.closed


def test_an_id_that_is_not_the_seq_is_a_gap() -> None:
    body = (HEAD + b'id: 0\ndata: {"type":"ready","last_seq":0}\n\n'
            + message(1) + message(2, event_id=9) + message(3, event_id=-1))
    stream, _ = feed(body)
    assert stream.received == 3
    assert stream.gaps == 2  # seq 2 said id 9; seq 3 had no id at all


def test_event_close_ends_the_stream_with_its_code() -> None:
    body = HEAD + b'event: close\ndata: {"code":4001,"reason":"invalid site token"}\n\n'
    stream, _ = feed(body)
    assert stream.close_code == 4001
    assert stream.closed
    with pytest.raises(HandshakeError):
        stream.ready.result()


def test_a_refused_request_fails_the_opening() -> None:
    stream, _ = feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(HandshakeError, match="403"):
        stream.ready.result()


def test_socket_paths_become_stream_paths() -> None:
    assert sse_path("/ws/dialogs/5?token=T") == "/sse/dialogs/5?token=T"
    assert sse_path("/ws/widget/dialogs/5?guest_token=G") == "/sse/widget/dialogs/5?guest_token=G"
    assert as_sse([(5, "/ws/site/dialogs/5?site_token=S", "https://a.example")]) == [
        (5, "/sse/site/dialogs/5?site_token=S", "https://a.example")]
