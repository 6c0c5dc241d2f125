"""A dialog socket client that behaves as a browser widget should.

It keeps the last ``seq`` it saw, and when the socket drops (gateway restart,
network, 1012, 4008) it reconnects with backoff and ``since=<last seq>``, so it
receives everything it missed and nothing twice. With ``transport="sse"`` it
reads the endpoint's server-sent events twin (``/sse/…``) instead and resumes
the way a browser's EventSource does, with ``Last-Event-ID: <last seq>``. The test suite and
``replyx bench`` use it; ``replyx.js`` is the same logic for browsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from replyx.backoff import Backoff
from replyx.protocol import FATAL_CLOSE_CODES
from replyx_client.sse import EventStream, StreamRefusedError, sse_connect

log = logging.getLogger("replyx_client")


class DialogClosedError(Exception):
    """The socket closed for good (a fatal close code, or reconnecting is off)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"socket closed with {code} {reason or ''}".strip())
        self.code = code
        self.reason = reason


@dataclass
class Frame:
    data: dict[str, Any]
    received_at: float  # time.time() when read


@dataclass
class DialogClient:
    """One dialog socket; ``messages`` holds every message frame received, in order.

    :param url: the full ``ws://…/ws/…/dialogs/N?…`` URL, without ``since``.
    :param resume: reconnect with ``since`` after a drop (a browser widget's behaviour).
    :param since: start from this seq (``None``: only what arrives from now on).
    :param transport: ``ws`` (WebSocket) or ``sse`` (server-sent events on the same URL
        with ``/sse/`` for ``/ws/``; ``url`` stays the socket's).
    """

    #: A dialog resumes at its last seq; an inbox starts from a fresh snapshot.
    resumes_with_seq = True

    url: str
    origin: str | None = None
    resume: bool = True
    since: int | None = None
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    on_frame: Callable[[Frame], None] | None = None
    transport: str = "ws"

    messages: list[dict[str, Any]] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    connects: int = 0
    duplicates: int = 0
    gaps: int = 0
    last_seq: int | None = None

    def __post_init__(self) -> None:
        self.last_seq = self.since
        self._conn: WebSocketClientConnection | EventStream | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed_for_good: DialogClosedError | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> DialogClient:  # noqa: ASYNC109
        """Open the socket and wait for ``ready``; raise :class:`DialogClosedError` if refused."""
        self._task = asyncio.ensure_future(self._run())
        await self.wait_ready(timeout)
        return self

    async def wait_ready(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if self._closed_for_good is not None:
                raise self._closed_for_good
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no ready frame within {timeout}s from {self.safe_url}")
            await self._wait_change(remaining)

    async def close(self) -> None:
        self._stopping = True
        if self._conn is not None:
            self._conn.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)

    @property
    def safe_url(self) -> str:
        """The URL with credential values removed, for messages and logs."""
        parts = urlsplit(self.url)
        query = [(k, "…" if "token" in k else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages]

    @property
    def final_close(self) -> DialogClosedError | None:
        return self._closed_for_good

    # -- waiting -------------------------------------------------------------------

    async def wait_for_seq(self, seq: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the message with ``seq`` (and so every one before it) has arrived."""
        await self.wait_until(
            lambda: self.last_seq is not None and self.last_seq >= seq, timeout,
            f"seq {seq}",
        )

    async def wait_for_frame(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0  # noqa: ASYNC109
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            for frame in self.frames:
                if predicate(frame.data):
                    found.append(frame.data)
                    return True
            return False

        await self.wait_until(check, timeout, "a matching frame")
        return found[0]

    async def wait_closed(self, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109
        """Wait for the current connection to close; return its close code."""
        count = len(self.close_codes)
        await self.wait_until(lambda: len(self.close_codes) > count, timeout, "a close")
        return self.close_codes[-1]

    async def wait_until(
        self, condition: Callable[[], bool], timeout: float, what: str  # noqa: ASYNC109
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self._closed_for_good is not None and not condition():
                raise self._closed_for_good
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.safe_url}: waited {timeout}s for {what}; have seqs"
                    f" {self.seqs[-10:]} (last {self.last_seq}), closes {self.close_codes}"
                )
            await self._wait_change(remaining)

    async def _wait_change(self, timeout: float) -> None:  # noqa: ASYNC109
        # asyncio.wait, not wait_for: on Python 3.11, wait_for returns the inner result
        # when the caller's cancellation lands in the same iteration as the change, and the
        # cancelled waiter would go on waiting (tests/test_client_cancel.py).
        self._changed.clear()
        change = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({change}, timeout=timeout)
        finally:
            change.cancel()

    def _notify(self) -> None:
        self._changed.set()

    # -- the connection loop -----------------------------------------------------

    def _request(self) -> HTTPRequest:
        url = self.url
        if self.last_seq is not None:
            url += ("&" if "?" in url else "?") + f"since={self.last_seq}"
        headers = {"Origin": self.origin} if self.origin else None
        return HTTPRequest(url, headers=headers, connect_timeout=5, request_timeout=10)

    @property
    def stream_url(self) -> str:
        """The SSE twin of ``url``: ``http(s)://…/sse/…``."""
        parts = urlsplit(self.url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        path = "/sse/" + parts.path.removeprefix("/ws/")
        return urlunsplit(parts._replace(scheme=scheme, path=path))

    async def _connect(self) -> WebSocketClientConnection | EventStream:
        if self.transport != "sse":
            return await websocket_connect(self._request(), ping_interval=None)
        headers = {"Origin": self.origin} if self.origin else {}
        url = self.stream_url
        if self.resumes_with_seq and self.last_seq is not None:
            headers["Last-Event-ID"] = str(self.last_seq)
        return await sse_connect(url, headers, timeout=5)

    def _stopped(self) -> bool:
        # A method, not the attribute: close() may set it while _run awaits, which mypy's
        # narrowing of ``self._stopping`` inside ``while not self._stopping`` cannot know.
        return self._stopping

    async def _run(self) -> None:
        backoff = Backoff(initial=self.backoff_initial, maximum=self.backoff_max)
        while not self._stopping:
            try:
                self._conn = await self._connect()
            except (OSError, HTTPClientError, TimeoutError, StreamRefusedError) as exc:
                if not self.resume:
                    self._closed_for_good = DialogClosedError(None, str(exc))
                    self._notify()
                    return
                await asyncio.sleep(backoff.next())
                continue
            if self._stopped():
                # close() came during the handshake, when there was nothing to close yet:
                # this connection must not stay open, unread, counted by the server.
                self._conn.close()
                return
            self.connects += 1
            self._ready.clear()
            got_ready = await self._read(self._conn)
            if got_ready:
                backoff.reset()
            code = self._conn.close_code
            self.close_codes.append(code)
            self._ready.clear()
            self._notify()
            if self._stopped():
                return
            if not self.resume or code in FATAL_CLOSE_CODES:
                self._closed_for_good = DialogClosedError(code, self._conn.close_reason)
                self._notify()
                return
            await asyncio.sleep(backoff.next())

    async def _read(self, conn: WebSocketClientConnection | EventStream) -> bool:
        got_ready = False
        while True:
            raw = await conn.read_message()
            if raw is None:
                return got_ready
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                log.warning("%s: ignored a frame that is not JSON", self.safe_url)
                continue
            if not isinstance(data, dict):
                continue
            frame = Frame(data, time.time())
            self.frames.append(frame)
            if self._apply(data):
                got_ready = True
                self._ready.set()
            if self.on_frame is not None:
                self.on_frame(frame)
            self._notify()

    def _apply(self, data: dict[str, Any]) -> bool:
        """Take one frame into the client's state; True for ``ready``."""
        kind = data.get("type")
        if kind == "message":
            seq = data["seq"]
            if self.last_seq is not None and seq <= self.last_seq:
                self.duplicates += 1
            else:
                if self.last_seq is not None and seq != self.last_seq + 1:
                    self.gaps += 1
                self.messages.append(data)
                self.last_seq = seq
        elif kind == "ready":
            if self.last_seq is None:
                self.last_seq = data["last_seq"]
            return True
        return False

    async def send(self, value: dict[str, Any]) -> None:
        """A client frame (``ping``); WebSocket only: an event stream has no uplink."""
        assert isinstance(self._conn, WebSocketClientConnection)
        await self._conn.write_message(orjson.dumps(value).decode())
