"""Load for ``replyx bench-workspace``: inbox sockets and widget-socket churn.

:class:`InboxSocket` is the lean client's ``/ws/inbox`` kind: it keeps, per
dialog, the newest ``last_seq`` it saw (snapshot, then ``dialog`` frames) and
counts the ``dialog`` frames that move it forward; each such frame's latency is
taken from the POST start written in ``last_message.text``. Frames that do not
move ``last_seq`` (read state, ``visitor_online``) are not messages and are
ignored. :class:`WorkspaceWorker` adds inbox and churn commands to the bench's
socket worker, :class:`WorkspacePool` drives them in every worker process.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import orjson

from replyx_ops.bench.load import Process, SocketPool, SocketWorker, serve_commands
from replyx_ops.bench.wsclient import MEASURED, STAMP_PREFIX, Recorder, Socket, open_socket

Spec = tuple[int, str, str | None]  # (dialog id or assistant id, path, Origin)


class InboxSocket(Socket):
    """One operator inbox; ``dialog_id`` holds the assistant the operator works on."""

    def __init__(self, group: str, dialog_id: int, recorder: Recorder) -> None:
        super().__init__(group, dialog_id, recorder)
        self.seqs: dict[int, int] = {}  # dialog → newest last_seq seen
        self.counts: collections.Counter[int] = collections.Counter()  # forward frames
        self.snapshots = 0

    def _text(self, payload: bytes, now: float) -> None:
        data = orjson.loads(payload)
        kind = data.get("type")
        if kind == "dialog":
            dialog_id, seq = data["dialog_id"], data["last_seq"]
            last = self.seqs.get(dialog_id)
            if last is not None and seq <= last:
                return
            if last is not None and seq != last + 1:
                self.gaps += 1
            self.seqs[dialog_id] = seq
            self.counts[dialog_id] += 1
            self.received += 1
            message = data.get("last_message") or {}
            text = message.get("text") or ""
            stamp = float(text[2:]) if text.startswith(STAMP_PREFIX) else None
            self.recorder.message(self, stamp, message.get("created_at"), now)
        elif kind == "snapshot":
            self.snapshots += 1
            for entry in data["dialogs"]:
                self.seqs[entry["dialog_id"]] = entry["last_seq"]
        elif kind == "ready" and not self.ready.done():
            self.ready.set_result(0)


class WorkspaceWorker(SocketWorker):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.inbox_recorder = Recorder()
        self.inboxes: list[InboxSocket] = []
        self.churn_open: collections.deque[tuple[Spec, Socket]] = collections.deque()
        self.churn_spare: collections.deque[Spec] = collections.deque()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {**super().handlers(), "open_inboxes": self.open_inboxes,
                "inbox_record": self.inbox_record, "inbox_settle": self.inbox_settle,
                "churn_open": self.open_churn, "churn": self.churn}

    async def _open(self, specs: list[Spec], group: str, recorder: Recorder,
                    kind: type[Socket] | None = None) -> tuple[list[Socket], list[str]]:
        gate = asyncio.Semaphore(64)
        errors: list[str] = []

        async def one(spec: Spec) -> Socket | None:
            async with gate:
                try:
                    return await open_socket(self.host, self.port, spec[1], spec[2], group,
                                             spec[0], recorder, kind=kind)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return None

        socks = await asyncio.gather(*(one(spec) for spec in specs))
        return [s for s in socks if s is not None], errors

    async def open_inboxes(self, specs: list[Spec]) -> dict[str, Any]:
        started = time.monotonic()
        socks, errors = await self._open(specs, "inbox", self.inbox_recorder, InboxSocket)
        self.inboxes += [s for s in socks if isinstance(s, InboxSocket)]
        return {"opened": len(socks), "failed": len(errors), "errors": errors[:3],
                "seconds": time.monotonic() - started}

    async def inbox_record(self, on: bool, baseline: dict[int, int]) -> dict[str, Any]:
        """Start counting: nothing at or below ``baseline`` (the database's last seqs) counts."""
        self.inbox_recorder.start(on)
        for sock in self.inboxes:
            sock.counts.clear()
            for dialog_id, seq in baseline.items():
                if sock.seqs.get(dialog_id, -1) < seq:
                    sock.seqs[dialog_id] = seq
        return {}

    async def inbox_settle(self, expected: dict[int, int], baseline: dict[int, int],
                           owner: dict[int, int], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until every inbox saw its dialogs' ``expected`` seqs; count the frames lost.

        ``owner`` maps each dialog to its assistant: an inbox of assistant A must get one
        forward ``dialog`` frame per message posted to every dialog of A.
        """
        mine: dict[int, list[int]] = {}
        for dialog_id, assistant_id in owner.items():
            mine.setdefault(assistant_id, []).append(dialog_id)
        deadline = time.monotonic() + timeout

        def behind() -> bool:
            return any(not s.closed and s.seqs.get(d, 0) < expected[d]
                       for s in self.inboxes for d in mine.get(s.dialog_id, ()))

        while behind() and time.monotonic() < deadline:
            await self.inbox_recorder.wait_change(0.2)
        lost = sum(max(0, expected[d] - baseline[d] - s.counts[d])
                   for s in self.inboxes for d in mine.get(s.dialog_id, ()))
        return {"sockets": len(self.inboxes), "lost": lost,
                "frames": sum(sum(s.counts.values()) for s in self.inboxes),
                "gaps": sum(s.gaps for s in self.inboxes),
                "closed": sum(1 for s in self.inboxes if s.closed),
                **self.inbox_recorder.measured()}

    async def open_churn(self, on: list[Spec], spare: list[Spec]) -> dict[str, Any]:
        """Widget sockets open on ``on``; ``spare`` dialogs wait (FIFO) for a visitor."""
        if self.recorder is None:
            self.recorder = Recorder()
        socks, errors = await self._open(on, "churn", self.recorder)
        by_dialog = {s.dialog_id: s for s in socks}
        self.churn_open.extend((spec, by_dialog[spec[0]]) for spec in on if spec[0] in by_dialog)
        self.churn_spare.extend(spare)
        return {"opened": len(socks), "failed": len(errors), "errors": errors[:3]}

    async def churn(self, rate: float, duration: float) -> dict[str, Any]:
        """``rate`` times a second: a visitor leaves (close) and another arrives (connect)."""
        assert self.recorder is not None
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        failed: list[str] = []
        connects = disconnects = 0
        recorder = self.recorder

        async def arrive(spec: Spec) -> None:
            nonlocal connects
            try:
                sock = await open_socket(self.host, self.port, spec[1], spec[2], "churn",
                                         spec[0], recorder)
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}"[:200])
                self.churn_spare.append(spec)
                return
            connects += 1
            self.churn_open.append((spec, sock))

        start = loop.time()
        for i in range(int(rate * duration)):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.churn_open:
                spec, sock = self.churn_open.popleft()
                sock.close()
                disconnects += 1
                self.churn_spare.append(spec)
            if self.churn_spare:
                task = asyncio.ensure_future(arrive(self.churn_spare.popleft()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        seconds = loop.time() - start
        await asyncio.gather(*tasks)
        return {"connects": connects, "disconnects": disconnects, "failed": len(failed),
                "errors": failed[:3], "seconds": seconds}


def workspace_worker_main(conn: Connection, host: str, port: int) -> None:
    serve_commands(conn, WorkspaceWorker(host, port).handlers())


class WorkspacePool(SocketPool):
    """The bench's socket pool, its workers able to hold inboxes and churn widgets."""

    def __init__(self, workers: int, host: str, port: int) -> None:
        self.workers = [Process(workspace_worker_main, host, port) for _ in range(workers)]

    def deal(self, name: str, **lists: list[Any]) -> list[dict[str, Any]]:
        """Send each worker its round-robin share of every list."""
        n = len(self.workers)
        return self.all(name, [{k: v[i::n] for k, v in lists.items()} for i in range(n)])

    def open_inboxes(self, specs: list[Spec]) -> dict[str, Any]:
        replies = self.deal("open_inboxes", specs=specs)
        failed = sum(r["failed"] for r in replies)
        if failed:
            raise RuntimeError(f"{failed} inbox sockets failed: {replies[0]['errors']}")
        return {"opened": sum(r["opened"] for r in replies),
                "seconds": max(r["seconds"] for r in replies)}

    def open_churn(self, on: list[Spec], spare: list[Spec]) -> int:
        replies = self.deal("churn_open", on=on, spare=spare)
        failed = sum(r["failed"] for r in replies)
        if failed:
            raise RuntimeError(f"{failed} widget sockets failed: {replies[0]['errors']}")
        return sum(int(r["opened"]) for r in replies)

    def inbox_settle(self, expected: dict[int, int], baseline: dict[int, int],
                     owner: dict[int, int], timeout: float) -> dict[str, Any]:
        replies = self.all("inbox_settle", expected=expected, baseline=baseline, owner=owner,
                           timeout=timeout)
        out: dict[str, Any] = {k: sum(r[k] for r in replies)
                               for k in ("sockets", "lost", "frames", "gaps", "closed")}
        for key in MEASURED:
            out[key] = [x for r in replies for x in r[key]]
        return out

    def start_churn(self, rate: float, duration: float) -> None:
        for worker in self.workers:
            worker.send("churn", rate=rate / len(self.workers), duration=duration)

    def churn_done(self) -> dict[str, Any]:
        replies = [worker.reply() for worker in self.workers]
        return {"connects": sum(r["connects"] for r in replies),
                "disconnects": sum(r["disconnects"] for r in replies),
                "failed": sum(r["failed"] for r in replies),
                "seconds": max(r["seconds"] for r in replies)}
