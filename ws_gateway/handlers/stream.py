"""The SSE transport of a session: ``GET /sse/…`` answered with an endless event stream.

The response head goes out at once; from then on the body is the session's
frames rendered as events (:mod:`ws_gateway.sse`), written through the same
:class:`~ws_gateway.transport.Transport` as a WebSocket's, with the same buffer
limit, 4008 policy and ``drained()``. The connection is taken over from Tornado's
HTTP layer (``detach``), as a WebSocket's is, and the body ends when the
connection closes (``Connection: close``, no length): nginx re-chunks it for
the browser.

A refusal or a server close is one ``event: close`` with ``{"code","reason"}``
(the code a socket would get), after whatever was already queued, then the end
of the stream. The resume point is ``Last-Event-ID`` when the client sends one
(a browser's own reconnect), else ``since``.

The origin rule is the socket's, with one addition browsers force on us: an
EventSource request to its own origin carries no ``Origin`` header. Then the
page's origin is this request's own (``Sec-Fetch-Site: same-origin``, which a
page cannot forge; scheme and host as the browser used them, through nginx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tornado.iostream import IOStream, StreamClosedError

from replyx.addresses import is_loopback
from replyx.protocol import CloseCode, non_negative_int
from ws_gateway.handlers.session import Refused, Session
from ws_gateway.sse import KEEP_ALIVE, RETRY_MS, close_event

log = logging.getLogger("ws_gateway.sockets")

#: How long a closing stream may take to hand its last events to the kernel.
CLOSE_GRACE = 5.0
#: A client sends nothing after its request; more than this and it is not an EventSource.
MAX_CLIENT_BYTES = 64 * 1024

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache, no-store\r\n"
    b"X-Accel-Buffering: no\r\n"
    # Credentials travel in the URL, never in cookies: any page may read the stream it was
    # given a token for, as any page may open the socket.
    b"Access-Control-Allow-Origin: *\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"retry: %d\n\n" % RETRY_MS
)


class DialogStream(Session):
    """A session over server-sent events. Kinds combine this with their :class:`Session`."""

    transport_name = "sse"
    #: When it last wrote an event, on the keep-alive ticker's clock (:class:`Streams`).
    written_tick = 0

    async def get(self, raw_id: str = "") -> None:
        stream = self.detach()
        self.application.log_request(self)  # the access line a socket's 101 gets (redacted)
        transport = self.make_transport(stream)
        stream.set_close_callback(self.ended)
        streams = self.parts.streams
        streams.add(self)
        transport.write(HEAD)
        self._reader = asyncio.ensure_future(self._discard_input(stream))
        await self.start(raw_id)

    # -- the session's hooks ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        transport = self.transport
        return not self._closing and transport is not None and not transport.finished

    def write_frame(self, frame: bytes) -> bool:
        transport = self.transport
        if transport is None:
            return False
        streams = self.parts.streams
        self.written_tick = streams.ticks  # no keep-alive needed for a while
        return self._batch.write(transport, streams.event(frame))

    def _since(self) -> int | None:
        raw = self.request.headers.get("Last-Event-ID", "").strip()
        if not raw:
            return super()._since()
        since = non_negative_int(raw)
        if since is None:
            raise Refused(CloseCode.BAD_REQUEST, "Last-Event-ID must be a non-negative integer")
        return since

    def page_origin(self) -> str | None:
        headers = self.request.headers
        origin = headers.get("Origin")
        if origin or headers.get("Sec-Fetch-Site") != "same-origin":
            return origin
        scheme = self.request.protocol
        forwarded = headers.get("X-Forwarded-Proto", "")
        if forwarded in ("http", "https") and is_loopback(self.request.remote_ip or ""):
            scheme = forwarded  # our nginx terminated the browser's connection
        return f"{scheme}://{self.request.host}"

    def keep_alive(self) -> None:
        transport = self.transport
        if transport is not None and self._joined and not transport.stream.writing():
            transport.write(KEEP_ALIVE)

    # -- the end -------------------------------------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Stop frames, send ``event: close`` after what is queued, then end the stream."""
        if self._closing:
            return
        self._closing = True
        if self._server_close_code is None:
            self._server_close_code = code
        transport = self.transport
        if transport is None:
            return
        transport.close()
        stream = transport.stream
        if stream.closed():
            return
        if code is not None:
            with contextlib.suppress(StreamClosedError):
                stream.write(close_event(code, reason or ""))
        self._ender = asyncio.ensure_future(self._end(stream))

    @staticmethod
    async def _end(stream: IOStream) -> None:
        with contextlib.suppress(StreamClosedError, TimeoutError):
            # Shielded: cancelling Tornado's own write future would log an error.
            await asyncio.wait_for(asyncio.shield(stream.write(b"")), CLOSE_GRACE)
        stream.close()

    async def _discard_input(self, stream: IOStream) -> None:
        """Read until the client hangs up (that is how a stream learns it is gone)."""
        received = 0
        with contextlib.suppress(StreamClosedError):
            while received <= MAX_CLIENT_BYTES:
                received += len(await stream.read_bytes(4096, partial=True))
            stream.close()

    def ended(self) -> None:
        self.parts.streams.discard(self)
        super().ended()
