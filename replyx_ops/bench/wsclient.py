"""A lean WebSocket client for the load generator: thousands per process, little CPU each.

``replyx_client.DialogClient`` keeps every frame and reconnects like a browser;
here a socket only counts what it receives, checks ``seq`` order and measures
latency, so one load-generator process can hold thousands of sockets without
becoming the bottleneck it is meant to measure. It speaks just enough RFC 6455
for a server that sends small unfragmented text frames: the handshake, text,
ping (answered), close.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from datetime import datetime

import orjson

# The poster writes ``t=<unix time of the POST start>`` as the message text.
STAMP_PREFIX = "t="


#: Linux's SO_TIMESTAMPNS (and SCM_TIMESTAMPNS): each recvmsg carries the time the kernel
#: received the data, as a struct timespec. The socket module does not name it.
_SO_TIMESTAMPNS = 35
_STAMP = struct.Struct("qq")
_STAMP_SPACE = socket.CMSG_SPACE(_STAMP.size)

#: What a :class:`Recorder` measures, each a list of milliseconds (see its attributes).
MEASURED = ("latencies_ms", "from_insert_ms", "arrival_ms")


class HandshakeError(Exception):
    pass


class StampedSocket(socket.socket):
    """A TCP socket whose ``recv`` also keeps when the kernel received the data (``arrived``).

    asyncio's transport reads with ``recv``; here that is a ``recvmsg`` whose ancillary data
    is the arrival time of the newest segment read (so of the last frame in it). The time a
    frame *arrived* does not depend on how many other sockets this process had to read
    first; the time it was *read* does, and only the load generator pays that.
    """

    arrived: float | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, ancillary, _, _ = self.recvmsg(bufsize, _STAMP_SPACE, flags)
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _STAMP.unpack_from(raw)
                self.arrived = seconds + nanoseconds * 1e-9
        return data

    def stamp(self) -> bool:
        """Ask for arrival times; False where the kernel offers none (then read time is used)."""
        try:
            self.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            return False
        return True


class Socket(asyncio.Protocol):
    """One dialog socket. ``ready`` resolves with the ``ready`` frame's ``last_seq``."""

    #: The status line of a successful opening (an SSE twin expects ``200``).
    OPENED = b" 101 "

    def __init__(self, group: str, dialog_id: int, recorder: Recorder) -> None:
        self.group = group
        self.dialog_id = dialog_id
        self.recorder = recorder
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.stamped: StampedSocket | None = None  # set by open_socket
        self.upgraded = False
        self.buffer = bytearray()
        self.start_seq: int | None = None
        self.last_seq: int | None = None
        self.received = 0  # distinct message frames
        self.duplicates = 0
        self.gaps = 0
        self.close_code: int | None = None
        self.closed = False

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def arrived(self) -> float | None:
        """When the kernel received the data being handled (None without arrival times)."""
        return self.stamped.arrived if self.stamped is not None else None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:end]).split(b"\r\n", 1)[0]
            del self.buffer[: end + 4]
            if self.OPENED not in status + b" ":
                self._fail(HandshakeError(status.decode(errors="replace")))
                return
            self.upgraded = True
        self._frames(time.time())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(HandshakeError(f"closed before ready ({self.close_code})"))
        self.recorder.changed()

    # -- frames ------------------------------------------------------------------------

    def _frames(self, now: float) -> None:
        buf = self.buffer
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            opcode = buf[pos] & 0x0F
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > size:
                break
            payload = bytes(buf[pos + head : end])
            pos = end
            if opcode == 0x1:
                self._text(payload, now)
            elif opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._send(0x8, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                break
        del buf[:pos]

    def _text(self, payload: bytes, now: float) -> None:
        data = orjson.loads(payload)
        kind = data.get("type")
        if kind == "message":
            seq = data["seq"]
            last = self.last_seq
            if last is not None and seq <= last:
                self.duplicates += 1
                return
            if last is not None and seq != last + 1:
                self.gaps += 1
            self.last_seq = seq
            self.received += 1
            text = data.get("text", "")
            stamp = float(text[2:]) if text.startswith(STAMP_PREFIX) else None
            self.recorder.message(self, stamp, data.get("created_at"), now)
        elif kind == "ready":
            if self.last_seq is None:
                self.last_seq = self.start_seq = data["last_seq"]
            if not self.ready.done():
                self.ready.set_result(data["last_seq"])

    def request(self, host: str, port: int, path: str, origin: str | None) -> bytes:
        """The opening request: a WebSocket upgrade."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin:
            lines.append(f"Origin: {origin}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _send(self, opcode: int, payload: bytes) -> None:
        """Client frames are masked (RFC 6455 5.3); only control frames are sent here."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, (1000).to_bytes(2, "big"))
            self.transport.close()


class Recorder:
    """Collects what the sockets of one process saw: latencies and the last frame's time."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        # From the row's created_at (its INSERT, in the database) to the frame: the part of
        # the latency that is Postgres, NOTIFY and the gateway, without the HTTP backend.
        self.from_insert_ms: list[float] = []
        # From the POST to the frame's arrival at this machine's kernel: the latency without
        # this process's own queue (it reads many sockets; a browser reads one).
        self.arrival_ms: list[float] = []
        self.recording = False
        self.last_frame_at = 0.0
        self.frames = 0
        self._waiter: asyncio.Event = asyncio.Event()

    def message(self, sock: Socket, stamp: float | None, created_at: str | None,
                now: float) -> None:
        self.frames += 1
        self.last_frame_at = now
        if self.recording and stamp is not None:
            self.latencies_ms.append((now - stamp) * 1000.0)
            arrived = sock.arrived
            if arrived is not None:
                self.arrival_ms.append((arrived - stamp) * 1000.0)
            if created_at:
                inserted = datetime.fromisoformat(created_at).timestamp()
                self.from_insert_ms.append((now - inserted) * 1000.0)
        self._waiter.set()

    def start(self, recording: bool) -> None:
        """Forget what was measured so far; from now on measure only when ``recording``."""
        self.recording = recording
        self.latencies_ms, self.from_insert_ms, self.arrival_ms = [], [], []

    def measured(self) -> dict[str, list[float]]:
        return {key: getattr(self, key) for key in MEASURED}

    def changed(self) -> None:
        self._waiter.set()

    async def wait_change(self, timeout: float) -> None:  # noqa: ASYNC109
        self._waiter.clear()
        try:
            await asyncio.wait_for(self._waiter.wait(), timeout)
        except TimeoutError:
            pass


async def open_socket(
    host: str, port: int, path: str, origin: str | None, group: str, dialog_id: int,
    recorder: Recorder, timeout: float = 30.0,  # noqa: ASYNC109
    kind: type[Socket] | None = None,
) -> Socket:
    """Connect, open, and wait for the ``ready`` frame (``kind``: a Socket subclass)."""
    loop = asyncio.get_running_loop()
    sock: Socket
    factory = kind or Socket
    raw = StampedSocket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setblocking(False)
    stamped = raw.stamp()
    try:
        await asyncio.wait_for(loop.sock_connect(raw, (host, port)), timeout)
        transport, sock = await loop.create_connection(
            lambda: factory(group, dialog_id, recorder), sock=raw)
    except BaseException:
        raw.close()
        raise
    if stamped:
        sock.stamped = raw
    transport.write(sock.request(host, port, path, origin))
    try:
        await asyncio.wait_for(asyncio.shield(sock.ready), timeout)
    except BaseException:
        transport.close()
        raise
    return sock

