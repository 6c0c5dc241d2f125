"""A TCP proxy between the gateway and Postgres that can forward, blackhole and cut.

It models the network faults a LISTEN connection meets in production:

* ``forward()``: bytes flow both ways (the default);
* ``blackhole()``: every connection stays open but nothing moves either way, as
  when a NAT or firewall silently drops the flow. Bytes already read wait in the
  proxy and flow again after ``forward()``, the way TCP retransmits after a
  partition heals; new connections are accepted and hang the same way;
* ``cut()``: every open connection is reset at once;
* ``hold_new()``: connections already open flow on, new ones are accepted and hang
  until ``release_new()`` (a server that cannot be reached again yet). It keeps a
  reconnect from succeeding for exactly as long as a test needs.

The target is a TCP ``(host, port)`` or a Unix socket path: the embedded
Postgres listens only on a Unix socket, the shared server on TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from tornado.ioloop import IOLoop

Target = tuple[str, int] | str


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


class Proxy:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._admitting = asyncio.Event()
        self._admitting.set()
        self.held = 0  # connections waiting in hold_new()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> str:
        return "forward" if self._flowing.is_set() else "blackhole"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def forward(self) -> None:
        self._flowing.set()

    def blackhole(self) -> None:
        self._flowing.clear()

    def hold_new(self) -> None:
        self._admitting.clear()

    def release_new(self) -> None:
        self._admitting.set()

    def cut(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close() sends RST, as a crashed middlebox would.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(client_w)
        if not self._admitting.is_set():
            self.held += 1
            try:
                await self._admitting.wait()
            finally:
                self.held -= 1
            if client_w.is_closing():
                return
        try:
            if isinstance(self.target, str):
                server_r, server_w = await asyncio.open_unix_connection(self.target)
            else:
                server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.add(server_w)
        pipes = [
            asyncio.ensure_future(self._pipe(client_r, server_w)),
            asyncio.ensure_future(self._pipe(server_r, client_w)),
        ]
        for task in pipes:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):
            writer.transport.abort()
            self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    return
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


@pytest.fixture
def make_proxy(io_loop: IOLoop) -> Iterator[Callable[[Target], Any]]:
    """``await make_proxy(target)`` → a started :class:`Proxy`, closed after the test."""
    proxies: list[Proxy] = []

    async def make(target: Target) -> Proxy:
        proxy = Proxy(target)
        proxies.append(proxy)
        return await proxy.start()

    yield make
    for proxy in proxies:
        io_loop.run_sync(proxy.close, timeout=10)
