"""The load generator: socket-holding worker processes and one posting process.

Each process runs its own asyncio loop and obeys commands sent over a pipe by
:mod:`replyx_ops.bench.run` (``(name, kwargs)`` in, a dict out), so the orchestrator can
step every process through the same phases: open sockets, record, settle,
close. Keeping them in separate processes keeps the measuring apart from the
measured servers, and lets the sockets spread over both cores.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing
import resource
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import asyncpg
import orjson

from replyx_ops.bench.sseclient import SseStream, is_sse
from replyx_ops.bench.wsclient import MEASURED, STAMP_PREFIX, Recorder, Socket, open_socket


def raise_fd_limit() -> None:
    """Thousands of sockets need thousands of descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_commands(conn: Connection, handlers: dict[str, Callable[..., Any]]) -> None:
    """Run ``handlers[name](**kwargs)`` (coroutines) for each command until ``exit``."""
    raise_fd_limit()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        while True:
            name, kwargs = await loop.run_in_executor(None, conn.recv)
            if name == "exit":
                conn.send({})
                return
            try:
                reply = await handlers[name](**kwargs)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            conn.send(reply)

    asyncio.run(main())


# -- socket workers ---------------------------------------------------------------------


class SocketWorker:
    """Holds a share of the sockets; answers ``open``, ``record``, ``settle``, ``close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.sockets: dict[str, list[Socket]] = {}
        self.recorder: Recorder | None = None

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "open": self.open, "record": self.record, "settle": self.settle,
            "close": self.close, "target": self.target,
        }

    async def target(self, host: str, port: int) -> dict[str, Any]:
        self.host, self.port = host, port
        return {}

    async def open(
        self, group: str, specs: list[tuple[int, str, str | None]], concurrency: int = 64
    ) -> dict[str, Any]:
        """Open ``(dialog_id, path, origin)`` sockets, ``concurrency`` handshakes at a time.

        A ``/sse/…`` path opens an event stream (:class:`SseStream`), counted alike.
        """
        if self.recorder is None:
            self.recorder = Recorder()
        recorder = self.recorder
        opened = self.sockets.setdefault(group, [])
        errors: list[str] = []
        gate = asyncio.Semaphore(concurrency)

        async def one(dialog_id: int, path: str, origin: str | None) -> None:
            async with gate:
                for attempt in range(3):
                    try:
                        sock = await open_socket(
                            self.host, self.port, path, origin, group, dialog_id, recorder,
                            kind=SseStream if is_sse(path) else None,
                        )
                    except (OSError, TimeoutError, Exception) as exc:
                        if attempt == 2:
                            errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        else:
                            await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    opened.append(sock)
                    return

        started = time.monotonic()
        await asyncio.gather(*(one(*spec) for spec in specs))
        return {
            "opened": len(specs) - len(errors), "failed": len(errors), "errors": errors[:3],
            "seconds": time.monotonic() - started,
        }

    async def record(self, on: bool) -> dict[str, Any]:
        assert self.recorder is not None
        self.recorder.start(on)
        return {}

    async def settle(
        self, groups: list[str], expected: dict[int, int], timeout: float  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Wait until every socket of ``groups`` has its dialog's expected last seq; count loss."""
        assert self.recorder is not None
        socks = [s for g in groups for s in self.sockets.get(g, [])]
        deadline = time.monotonic() + timeout

        def behind() -> list[Socket]:
            return [
                s for s in socks
                if not s.closed and (s.last_seq or 0) < expected.get(s.dialog_id, 0)
            ]

        while behind() and time.monotonic() < deadline:
            await self.recorder.wait_change(min(0.5, max(0.01, deadline - time.monotonic())))
        lost = 0
        for s in socks:
            want = expected.get(s.dialog_id)
            if want is None or s.start_seq is None:
                continue
            lost += max(0, want - s.start_seq - s.received)
        return {
            "sockets": len(socks),
            "lost": lost,
            "duplicates": sum(s.duplicates for s in socks),
            "gaps": sum(s.gaps for s in socks),
            "closed": sum(1 for s in socks if s.closed),
            "close_codes": sorted({s.close_code for s in socks if s.closed and s.close_code}),
            "last_frame_at": self.recorder.last_frame_at,
            **self.recorder.measured(),
        }

    async def close(self, group: str) -> dict[str, Any]:
        socks = self.sockets.pop(group, [])
        for s in socks:
            s.close()
        deadline = time.monotonic() + 10
        while any(not s.closed for s in socks) and time.monotonic() < deadline:
            assert self.recorder is not None
            await self.recorder.wait_change(0.1)
        return {"closed": len(socks)}


def socket_worker_main(conn: Connection, host: str, port: int) -> None:
    serve_commands(conn, SocketWorker(host, port).handlers())


# -- the posting process -------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection (Tornado's client opens one per request)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            try:
                self.writer.write(head + body)
                header = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed an idle keep-alive connection: reconnect once.
                self.writer.close()
                self.writer = None
                if attempt:
                    raise
                continue
            status = int(header[9:12])
            length = 0
            for line in header.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await self.reader.readexactly(length)
            return status
        raise ConnectionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Poster:
    """POSTs messages at a steady rate; also drives the raw commit-rate test."""

    async def post(
        self, host: str, port: int, paths: list[str], rate: float, duration: float,
        connections: int = 16, max_connections: int = 64,
    ) -> dict[str, Any]:
        """POST ``{"text": "t=<now>"}`` to ``paths`` round-robin, ``rate`` per second.

        ``connections`` keep-alive connections are opened first and taken in turn,
        so the requests spread over every server worker as many clients' would.
        """
        loop = asyncio.get_running_loop()
        every = [HttpConnection(host, port) for _ in range(connections)]
        idle: collections.deque[HttpConnection] = collections.deque(every)
        statuses: dict[int, int] = {}
        http_ms: list[float] = []
        errors: list[str] = []
        total = int(rate * duration)
        tasks: set[asyncio.Task[None]] = set()
        # Past this many requests in flight the server is not keeping up: wait, count as late.
        gate = asyncio.Semaphore(max_connections)

        async def one(path: str) -> None:
            if idle:
                conn = idle.popleft()
            else:
                conn = HttpConnection(host, port)
                every.append(conn)
            started = time.time()
            body = orjson.dumps({"text": f"{STAMP_PREFIX}{started:.6f}"})
            try:
                status = await conn.post(path, body)
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                conn.close()
                every.remove(conn)
                return
            http_ms.append((time.time() - started) * 1000.0)
            statuses[status] = statuses.get(status, 0) + 1
            idle.append(conn)

        start = loop.time() + 0.05
        began = time.time()
        late = 0
        for i in range(total):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                late += 1
            await gate.acquire()
            task = asyncio.ensure_future(one(paths[i % len(paths)]))
            task.add_done_callback(lambda _: gate.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent_for = time.time() - began
        await asyncio.gather(*tasks)
        for conn in every:
            conn.close()
        return {
            "sent": total, "seconds": sent_for, "rate": total / sent_for if sent_for else 0.0,
            "statuses": {str(k): v for k, v in statuses.items()}, "errors": errors[:5],
            "late": late, "http_ms": http_ms,
        }

    async def commit(
        self, dsn: str, dialog_ids: list[int], connections: int, duration: float
    ) -> dict[str, Any]:
        """As many single-row INSERT commits as Postgres takes, from ``connections`` clients."""

        conns = [await asyncpg.connect(dsn) for _ in range(connections)]
        counts = [0] * connections
        stop_at = time.monotonic() + duration

        async def client(index: int) -> None:
            conn = conns[index]
            mine = dialog_ids[index::connections] or dialog_ids
            i = 0
            while time.monotonic() < stop_at:
                await conn.execute(
                    "INSERT INTO messages (dialog_id, sender, text) VALUES ($1, 'system', 'r')",
                    mine[i % len(mine)],
                )
                i += 1
                counts[index] += 1

        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(connections)))
        seconds = time.monotonic() - started
        for conn in conns:
            await conn.close()
        return {"commits": sum(counts), "seconds": seconds}


def poster_main(conn: Connection) -> None:
    poster = Poster()
    serve_commands(conn, {"post": poster.post, "commit": poster.commit})


# -- the orchestrator's side ---------------------------------------------------------------


class Process:
    """One load-generator process and its command pipe."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()

    def send(self, name: str, **kwargs: Any) -> None:
        self.conn.send((name, kwargs))

    def reply(self, timeout: float = 600.0) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError("a load-generator process did not answer")
        reply: dict[str, Any] = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"load generator: {reply['error']}")
        return reply

    def call(self, name: str, **kwargs: Any) -> dict[str, Any]:
        self.send(name, **kwargs)
        return self.reply()

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, TimeoutError, EOFError, RuntimeError):
                self.send("exit")
                self.reply(10)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


class SocketPool:
    """The socket workers together: specs are dealt out round-robin."""

    def __init__(self, workers: int, host: str, port: int) -> None:
        self.workers = [Process(socket_worker_main, host, port) for _ in range(workers)]

    def all(self, name: str, per_worker: list[dict[str, Any]] | None = None,
            **kwargs: Any) -> list[dict[str, Any]]:
        for i, worker in enumerate(self.workers):
            worker.send(name, **(per_worker[i] if per_worker else kwargs))
        return [worker.reply() for worker in self.workers]

    def target(self, host: str, port: int) -> None:
        self.all("target", host=host, port=port)

    def open(
        self, group: str, specs: Sequence[tuple[int, str, str | None]]
    ) -> dict[str, Any]:
        n = len(self.workers)
        replies = self.all(
            "open", [{"group": group, "specs": list(specs[i::n])} for i in range(n)])
        failed = sum(r["failed"] for r in replies)
        errors = [e for r in replies for e in r["errors"]]
        if failed:
            raise RuntimeError(f"{failed} of {len(specs)} sockets failed to open: {errors[:3]}")
        return {"opened": sum(r["opened"] for r in replies),
                "seconds": max(r["seconds"] for r in replies)}

    def settle(self, groups: list[str], expected: dict[int, int], timeout: float
               ) -> dict[str, Any]:
        replies = self.all("settle", groups=groups, expected=expected, timeout=timeout)
        return {
            "sockets": sum(r["sockets"] for r in replies),
            "lost": sum(r["lost"] for r in replies),
            "duplicates": sum(r["duplicates"] for r in replies),
            "gaps": sum(r["gaps"] for r in replies),
            "closed": sum(r["closed"] for r in replies),
            "close_codes": sorted({c for r in replies for c in r["close_codes"]}),
            "last_frame_at": max(r["last_frame_at"] for r in replies),
            **{key: [x for r in replies for x in r[key]] for key in MEASURED},
        }

    def record(self, on: bool) -> None:
        self.all("record", on=on)

    def close(self, group: str) -> None:
        self.all("close", group=group)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
