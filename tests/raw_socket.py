"""A WebSocket client that speaks RFC 6455 by hand, for frames no polite client sends.

Tornado's client always answers pings, never fragments and never floods control
frames; a hostile or half-dead client does all of that. :class:`RawSocket` does
the opening handshake itself and then reads and writes single frames.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@dataclass
class Frame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    def json(self) -> object:
        return orjson.loads(self.payload)


def server_payloads(data: bytes) -> list[bytes]:
    """The payloads of complete, unmasked server frames written back to back."""
    payloads, pos = [], 0
    while pos < len(data):
        length, pos = data[pos + 1] & 0x7F, pos + 2
        if length == 126:
            (length,), pos = struct.unpack_from("!H", data, pos), pos + 2
        elif length == 127:
            (length,), pos = struct.unpack_from("!Q", data, pos), pos + 8
        payloads.append(data[pos:pos + length])
        pos += length
    return payloads


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # A live client answers the server's pings whenever it reads; a dead one never reads.
        self.answer_pings = True

    @classmethod
    async def connect(
        cls, url: str, *, origin: str | None = None, headers: dict[str, str] | None = None
    ) -> RawSocket:
        """Open ``ws://host:port/path?query`` and complete the opening handshake."""
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {parts.hostname}:{parts.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin:
            lines.append(f"Origin: {origin}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not status.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(status.split(b"\r\n", 1)[0].decode(errors="replace"))
        return cls(reader, writer)

    # -- writing -----------------------------------------------------------------

    def frame_bytes(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
        """One masked client frame (clients must mask, RFC 6455 §5.3)."""
        head = (0x80 if fin else 0) | opcode
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", head, 0x80 | length)
        elif length <= 0xFFFF:
            header = struct.pack("!BBH", head, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", head, 0x80 | 127, length)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return header + mask + masked

    async def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        self.writer.write(self.frame_bytes(opcode, payload, fin=fin))
        await self.writer.drain()

    async def send_json(self, value: object) -> None:
        await self.send(TEXT, orjson.dumps(value))

    async def send_many(self, frames: list[bytes]) -> None:
        """Write many frames at once; a peer that hangs up mid-way is not an error here."""
        try:
            self.writer.write(b"".join(frames))
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass

    # -- reading -------------------------------------------------------------------

    async def read(self, timeout: float = 10.0) -> Frame | None:  # noqa: ASYNC109
        """The next server frame, or ``None`` when the connection ended."""
        try:
            head, length = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        opcode = head & 0x0F
        length &= 0x7F
        try:
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if opcode == PING and self.answer_pings:
            self.writer.write(self.frame_bytes(PONG, payload))
        return Frame(opcode, payload)

    async def read_json(self, kind: str, timeout: float = 10.0) -> dict:  # noqa: ASYNC109
        """Skip pings and other frames until a JSON text frame of ``type == kind``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.read(max(deadline - loop.time(), 0.01))
            if frame is None:
                raise ConnectionError(f"closed while waiting for a {kind!r} frame")
            if frame.opcode == TEXT:
                data = frame.json()
                if isinstance(data, dict) and data.get("type") == kind:
                    return data

    async def close_code(self, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109
        """Read until the server's close frame (its code) or the end of the connection (None)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("the server did not close the connection")
            frame = await self.read(remaining)
            if frame is None:
                return None
            if frame.opcode == CLOSE:
                return frame.close_code

    async def ended(self, timeout: float = 30.0) -> bool:  # noqa: ASYNC109
        """True once the server has dropped the TCP connection (frames before it are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), deadline - loop.time())
            except TimeoutError:
                return False
            except ConnectionError:
                return True
            if not chunk:
                return True
        return False

    def close(self) -> None:
        self.writer.close()
