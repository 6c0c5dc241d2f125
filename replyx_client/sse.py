"""A small server-sent events reader on a raw connection, shaped like a WebSocket client.

:func:`sse_connect` sends ``GET`` with ``Accept: text/event-stream`` (and
``Last-Event-ID`` when resuming) and returns an :class:`EventStream` whose
:meth:`~EventStream.read_message` yields each event's data as a WebSocket
client yields frames, and ``None`` when the stream ends; an ``event: close``
sets ``close_code`` / ``close_reason`` as a close frame would. It reads a
close-delimited body (the gateway itself) and a chunked one (through nginx).
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

import orjson
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

MAX_HEAD = 64 * 1024


class StreamRefusedError(Exception):
    """The server answered with something other than an event stream."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"event stream refused: HTTP {status} {detail}".strip())
        self.code = status


class EventStream:
    """One open event stream (see :func:`sse_connect`)."""

    def __init__(self, stream: IOStream, chunked: bool, rest: bytes) -> None:
        self.stream = stream
        self.chunked = chunked
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.last_event_id: str | None = None
        self.comments = 0  # comment lines received (the server's keep-alives)
        self.retry: int | None = None
        self._raw = rest  # undecoded body bytes (chunk framing included when chunked)
        self._text = b""  # decoded body not yet parsed into events
        self._eof = False

    def close(self) -> None:
        self.stream.close()

    async def read_message(self) -> str | None:
        """The next event's data (``event: close`` recorded, not returned); None at the end."""
        while True:
            event = self._next_event()
            if event is not None:
                name, data = event
                if name == "close":
                    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                        info = orjson.loads(data)
                        self.close_code = int(info.get("code"))
                        self.close_reason = str(info.get("reason", ""))
                    continue
                return data
            if self._eof:
                self.stream.close()
                return None
            await self._fill()

    def _next_event(self) -> tuple[str, str] | None:
        while True:
            text = self._text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            end = text.find(b"\n\n")
            if end < 0:
                self._text = text
                return None
            block, self._text = text[:end], text[end + 2:]
            name, data, has_data = "message", [], False
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "data":
                    data.append(value)
                    has_data = True
                elif field == "event":
                    name = value
                elif field == "id":
                    self.last_event_id = value
                elif field == "retry" and value.isdigit():
                    self.retry = int(value)
            if has_data:
                return name, "\n".join(data)

    async def _fill(self) -> None:
        try:
            if not self.chunked:
                self._text += self._raw or await self.stream.read_bytes(65536, partial=True)
                self._raw = b""
                return
            while b"\r\n" not in self._raw:
                self._raw += await self.stream.read_bytes(65536, partial=True)
            size_line, _, after = self._raw.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(after) < size + 2:
                after += await self.stream.read_bytes(65536, partial=True)
            self._text += after[:size]
            self._raw = after[size + 2:]
            if size == 0:
                self._eof = True
        except StreamClosedError:
            self._eof = True


async def sse_connect(
    url: str, headers: dict[str, str] | None = None, *, timeout: float = 10.0  # noqa: ASYNC109
) -> EventStream:
    """Open ``url`` (``http://…``) as an event stream; raise StreamRefusedError unless 200."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream",
             "Cache-Control: no-cache"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    stream = await TCPClient().connect(host, port, timeout=timeout,
                                       ssl_options={} if parts.scheme == "https" else None)
    try:
        await stream.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=MAX_HEAD)
    except BaseException:
        stream.close()
        raise
    status_line, *header_lines = head.decode("latin-1").splitlines()
    status = int(status_line.split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in
              (line.partition(":") for line in header_lines if line)}
    if status != 200 or not fields.get("content-type", "").startswith("text/event-stream"):
        stream.close()
        raise StreamRefusedError(status, fields.get("content-type", ""))
    chunked = "chunked" in fields.get("transfer-encoding", "").lower()
    return EventStream(stream, chunked, b"")
