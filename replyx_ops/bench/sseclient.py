"""The SSE twin of the load generator's lean socket: an event stream that only counts.

:class:`SseStream` is a :class:`~replyx_ops.bench.wsclient.Socket` that opens
``GET /sse/…`` (``Accept: text/event-stream``, the same credentials in the URL and
the same ``Origin``) instead of a WebSocket upgrade, and reads events instead of
frames. Each event's ``data`` is the JSON a socket's text frame carries, so the
counting is the socket's own (``Socket._text``): receive time per message event,
``seq`` order, duplicates, gaps and loss are detected exactly as for a socket,
and the pool (:mod:`replyx_ops.bench.load`) handles both kinds alike.

Invariant: a message event counts as received only once, in ``seq`` order, and its
``id:`` must be its ``seq`` (the resume point a browser would send back as
``Last-Event-ID``); a message event with another id counts as a gap, since a
reconnect from it would skip or repeat messages. ``event: close`` sets
``close_code`` as a close frame would. It reads the gateway's own rendering
(``ws_gateway.sse``: LF line ends, a close-delimited body), which is what the bench
connects to; ``replyx_client.sse`` is the full reader (chunked bodies, CRLF).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from replyx_ops.bench.wsclient import Socket

Spec = tuple[int, str, str | None]


def sse_path(path: str) -> str:
    """The event-stream twin of a socket path: ``/ws/site/…`` → ``/sse/site/…``."""
    return "/sse/" + path.removeprefix("/ws/") if path.startswith("/ws/") else path


def as_sse(specs: Sequence[Spec]) -> list[Spec]:
    """The same ``(dialog_id, path, origin)`` specs, each opened as an event stream."""
    return [(dialog_id, sse_path(path), origin) for dialog_id, path, origin in specs]


def is_sse(path: str) -> bool:
    return path.startswith("/sse/")


class SseStream(Socket):
    """One dialog event stream, counted like a socket (see the module's invariant)."""

    OPENED = b" 200 "

    def request(self, host: str, port: int, path: str, origin: str | None) -> bytes:
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
        ]
        if origin:
            lines.append(f"Origin: {origin}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _frames(self, now: float) -> None:
        """Every complete event in the buffer (events end with a blank line)."""
        buf = self.buffer
        pos = 0
        while True:
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            self._event(bytes(buf[pos:end]), now)
            pos = end + 2
        del buf[:pos]

    def _event(self, block: bytes, now: float) -> None:
        name = b""
        event_id: int | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"id":
                event_id = int(value) if value.isdigit() else -1
            elif field == b"event":
                name = value
            # "" is a comment (the keep-alive), "retry" the browser's reconnect delay.
        if not data:
            return
        payload = b"\n".join(data)
        if name == b"close":
            info = orjson.loads(payload)
            self.close_code = int(info["code"]) if isinstance(info, dict) else None
            if self.transport is not None:
                self.transport.close()
            return
        received = self.received
        self._text(payload, now)
        if self.received != received and event_id != self.last_seq:
            self.gaps += 1

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
