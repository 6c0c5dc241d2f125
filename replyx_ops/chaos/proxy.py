"""A TCP proxy in front of Postgres that tells the gateway's connections from the rest.

Every connection of the stack (backend pool, gateway pool, LISTEN connection)
goes through it; it reads the startup packet to learn the connection's
``application_name`` (after answering the SSL / GSS encryption probes the way the
server does) and files it under a *class*: ``listener`` (the LISTEN connection),
``gateway`` (the gateway's query pool) or ``other`` (the backend, migrations).
Faults then act on the listener alone or on every gateway connection, while the
backend keeps writing, which is the partition the soak wants: the gateway cut off
from the database that the writers still reach.

It runs its own event loop in a thread so that the soak's own work (clients,
checker, the plot) never delays the backend's queries. Modes per class:

* ``forward`` — bytes flow;
* ``blackhole`` — nothing moves and new connections hang, as when a firewall
  drops the flow; held bytes flow again when it lifts, as TCP retransmits;
* ``delay`` — each chunk waits ``delay`` seconds before it is passed on;
* :meth:`PgProxy.cut` resets the class's open connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from replyx.protocol import GATEWAY_APPLICATION, LISTENER_APPLICATION

Target = tuple[str, int] | str

LISTENER = "listener"
GATEWAY = "gateway"
OTHER = "other"
CLASSES = (LISTENER, GATEWAY, OTHER)
#: What a fault aims at: the LISTEN connection alone, or every connection of the gateway.
SCOPES = {"listener": (LISTENER,), "gateway": (LISTENER, GATEWAY)}

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_STARTUP_MAX = 10_000


def postgres_target(url: str) -> Target:
    """Where a libpq URL points: a Unix socket path (``?host=/dir``) or ``(host, port)``."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "localhost"
    port = int(query.get("port") or parts.port or 5432)
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


def via_proxy(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's (user, password, database kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def classify(application_name: str | None) -> str:
    if application_name == LISTENER_APPLICATION:
        return LISTENER
    if application_name == GATEWAY_APPLICATION:
        return GATEWAY
    return OTHER


@dataclass
class _Mode:
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    delay: float = 0.0


@dataclass
class _Link:
    cls: str
    writers: list[asyncio.StreamWriter]


class PgProxy:
    """The proxy; thread-safe controls (:meth:`blackhole`, :meth:`delay`, :meth:`cut`, …)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.port = 0
        self.accepted = dict.fromkeys(CLASSES, 0)
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-pg-proxy",
                                        daemon=True)
        self._modes: dict[str, _Mode] = {}
        self._links: list[_Link] = []
        self._server: asyncio.Server | None = None

    # -- lifecycle (called from any thread) -------------------------------------------

    def start(self) -> PgProxy:
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- controls --------------------------------------------------------------------

    def forward(self, classes: Iterable[str] = CLASSES) -> None:
        self._call(self._set(tuple(classes), flowing=True, delay=0.0)).result(5)

    def blackhole(self, classes: Iterable[str]) -> None:
        self._call(self._set(tuple(classes), flowing=False, delay=0.0)).result(5)

    def delay(self, classes: Iterable[str], seconds: float) -> None:
        self._call(self._set(tuple(classes), flowing=True, delay=seconds)).result(5)

    def cut(self, classes: Iterable[str]) -> int:
        """Reset every open connection of ``classes``; return how many there were."""
        return int(self._call(self._cut(tuple(classes))).result(5))

    def open_connections(self) -> dict[str, int]:
        counts = dict.fromkeys(CLASSES, 0)
        for link in list(self._links):
            counts[link.cls] += 1
        return counts

    # -- inside the proxy's loop -------------------------------------------------------

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self) -> None:
        for cls in CLASSES:
            mode = _Mode()
            mode.flowing.set()
            self._modes[cls] = mode
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut(CLASSES)

    async def _set(self, classes: tuple[str, ...], *, flowing: bool, delay: float) -> None:
        for cls in classes:
            mode = self._modes[cls]
            mode.delay = delay
            if flowing:
                mode.flowing.set()
            else:
                mode.flowing.clear()

    async def _cut(self, classes: tuple[str, ...]) -> int:
        cut = 0
        for link in list(self._links):
            if link.cls not in classes:
                continue
            cut += 1
            for writer in link.writers:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    # SO_LINGER 0: close() sends RST, as a crashed middlebox would.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                writer.transport.abort()
        self.cuts += cut
        return cut

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.target, str):
            return await asyncio.open_unix_connection(self.target)
        return await asyncio.open_connection(*self.target)

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        link = _Link(OTHER, [client_w])
        self._links.append(link)
        try:
            server_r, server_w = await asyncio.wait_for(self._open_upstream(), 10)
        except (OSError, TimeoutError):
            client_w.transport.abort()
            self._links.remove(link)
            return
        link.writers.append(server_w)
        try:
            startup = await asyncio.wait_for(self._handshake(client_r, client_w, server_r,
                                                             server_w), 15)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            for writer in link.writers:
                writer.transport.abort()
            self._links.remove(link)
            return
        link.cls = classify(startup.get("application_name"))
        self.accepted[link.cls] += 1
        mode = self._modes[link.cls]
        # A new connection of a blackholed class hangs, as a SYN into a black hole would.
        await mode.flowing.wait()
        pipes = [
            asyncio.ensure_future(self._pipe(client_r, server_w, mode)),
            asyncio.ensure_future(self._pipe(server_r, client_w, mode)),
        ]
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        for writer in link.writers:
            writer.transport.abort()
        self._links.remove(link)

    async def _handshake(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                         server_r: asyncio.StreamReader, server_w: asyncio.StreamWriter
                         ) -> dict[str, str]:
        """Pass the encryption probes and the startup packet on; return its parameters."""
        while True:
            head = await client_r.readexactly(8)
            length, code = struct.unpack("!ii", head)
            if not 8 <= length <= _STARTUP_MAX:
                raise ValueError("not a Postgres startup packet")
            rest = await client_r.readexactly(length - 8)
            server_w.write(head + rest)
            await server_w.drain()
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                answer = await server_r.readexactly(1)
                client_w.write(answer)
                await client_w.drain()
                if answer != b"N":
                    return {}  # encrypted from here on: unclassified, just forwarded
                continue
            if code == _CANCEL_REQUEST:
                return {}
            fields = rest.split(b"\0")
            return {
                fields[i].decode(errors="replace"): fields[i + 1].decode(errors="replace")
                for i in range(0, len(fields) - 1, 2) if fields[i]
            }

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    mode: _Mode) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await mode.flowing.wait()
                data = await reader.read(65536)
                if not data:
                    return
                if mode.delay:
                    await asyncio.sleep(mode.delay)
                await mode.flowing.wait()
                writer.write(data)
                await writer.drain()
