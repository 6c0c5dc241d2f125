"""The one task that turns queued NOTIFY payloads into routed frames, a batch at a time.

Invariant: frames are held (corked) only while this consumer routes a batch,
and only by its :class:`WriteBatch`. A batch ends when the queue runs dry or
after ``BATCH_SECONDS`` of routing; a burst's when no read comes within
``BURST_GAP_SECONDS`` of a dry queue, or once ``HOLD_SECONDS`` have passed (plus
its last stretch of routing and its wait for a read: ``BATCH_SECONDS`` and
``BURST_GAP_SECONDS`` at most). No other task (a replay, a join, a pong) finds
its frames held behind someone else's batch: every await of the consumer is
preceded by a flush, except those a burst makes to let the listener read on,
during which the batch is *paused* — a write to a socket with nothing held
goes out at once, and one to a socket with frames held joins them in order
(which a later write must not overtake). A task that waits for its socket to
drain flushes that socket first (:meth:`WriteBatch.flush_one`). Sockets never
hold frames themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from replyx.protocol import CloseCode, FrameType
from replyx.timing import GatewayStage
from ws_gateway import gctune
from ws_gateway.events import (
    DIALOG_PREFIX,
    BadPayloadError,
    DialogEvent,
    PresenceEvent,
    TeamEvent,
    parse_event,
    unix_time,
)
from ws_gateway.metrics import Stats
from ws_gateway.presence import Presence
from ws_gateway.router import Router
from ws_gateway.workspace import Workspace

log = logging.getLogger("ws_gateway")

# Longest stretch of routing before other tasks get a turn.
BATCH_SECONDS = 0.01
# A batch that has routed this many notifications is a burst: while more keep arriving it
# stays open (paused across each turn the listener gets), so a socket whose dialog gets several
# of them receives them in one send instead of one send per turn.
BURST_NOTIFICATIONS = 64
# How long a burst's batch stays open (its last stretch of routing may end after it): each
# socket gets one send per stretch of this length, and no frame of a burst waits longer.
HOLD_SECONDS = 0.1
# How long a burst's batch waits for the listener's next read when the queue runs dry: the
# burst is over when nothing comes in that time (Postgres delivers a big commit's notifications
# in reads a fraction of a millisecond apart, further apart on a busy machine).
BURST_GAP_SECONDS = 0.001
# Stage timing (replyx.timing) and the lag histogram take a sample: every message of a batch
# up to BURST_NOTIFICATIONS, so all of steady traffic, and past that one message in
# TIME_ONE_IN of a burst (its clocks, histogram bisects and created_at parse were a tenth of
# a burst's CPU).
TIME_ONE_IN = 16


class Writer(Protocol):
    """What a batch writes to: one socket's write path (see ``transport.Transport``)."""

    @property
    def dialog_id(self) -> int: ...

    @property
    def closing(self) -> bool: ...

    def write(self, data: bytes) -> bool:
        """Write whole frames; False when the socket is gone or closing."""

    def fail(self, code: int, reason: str) -> None:
        """Close the socket after an internal error."""


class WriteBatch:
    """Frames held for their sockets while a batch of notifications is routed.

    Holding lets the frames one socket gets from one batch leave in one ``send``:
    during a burst on a busy dialog that is one system call per socket instead of
    one per frame. Outside a batch, :meth:`write` writes at once.
    """

    def __init__(self) -> None:
        self._held: dict[Writer, list[bytes]] | None = None
        self._paused = False

    def write(self, writer: Writer, frame: bytes) -> bool:
        """Write ``frame`` now, or hold it until :meth:`flush` while a batch is open.

        While the batch is paused (other tasks run), only a socket that already has frames
        held gets this one held too, behind them: its frames keep their order.
        """
        held = self._held
        if held is None:
            return writer.write(frame)
        if writer.closing:
            return False
        frames = held.get(writer)
        if frames is not None:
            frames.append(frame)
        elif self._paused:
            return writer.write(frame)
        else:
            held[writer] = [frame]
        return True

    def open(self) -> None:
        self._held = {}
        self._paused = False

    def pause(self) -> None:
        """Other tasks are about to run with this batch open: see :meth:`write`."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def flush(self) -> None:
        """Send what the batch held, one write per socket, and stop holding."""
        held, self._held = self._held, None
        self._paused = False
        for writer, frames in (held or {}).items():
            self._send(writer, frames)

    def flush_one(self, writer: Writer) -> None:
        """Send what is held for ``writer`` now (it is about to wait for its buffer to drain)."""
        frames = self._held.pop(writer, None) if self._held is not None else None
        if frames:
            self._send(writer, frames)

    @staticmethod
    def _send(writer: Writer, frames: list[bytes]) -> None:
        if writer.closing:
            return
        try:
            writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except Exception:
            log.exception("flushing frames to a socket of dialog %d failed", writer.dialog_id)
            writer.fail(CloseCode.INTERNAL_ERROR, "internal error, resume with since")


class Consumer:
    """Parses queued payloads and hands them to the router, in batches of ``BATCH_SECONDS``."""

    def __init__(
        self, router: Router, workspace: Workspace, presence: Presence, stats: Stats,
        batch: WriteBatch,
    ) -> None:
        self.router = router
        self.workspace = workspace
        self.presence = presence
        self.stats = stats
        self.batch = batch
        # (payload, when it was read off the LISTEN connection)
        self.queue: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # Messages of the batch being routed: (read, taken, parsed) times, for the stages.
        self._timed: list[tuple[float, float, float]] = []
        self._messages = 0  # routed in this batch, timed or not
        # While a batch is open: whether collections were on before it (None: not held).
        self._collecting: bool | None = None

    def put(self, payload: str) -> None:
        """The listener's callback: queue and return (parsing and routing happen in the task).

        A ``dialog`` event while no inbox is open here is only counted: every message
        sends one, and no one here would read it.
        """
        if payload.startswith(DIALOG_PREFIX) and not self.workspace.wants_dialogs():
            self.stats.notifications += 1
            return
        self.queue.put_nowait((payload, time.time()))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        """Route notifications in batches; each batch's frames leave in one write per socket.

        A batch is what is queued, up to ``BATCH_SECONDS`` of routing. Then the held
        frames are flushed and the loop yields, so a burst cannot starve the
        listener's probe, pings and handshakes for longer than one batch.

        A burst (``BURST_NOTIFICATIONS`` routed in this batch) is the exception: the loop
        yields with the batch paused, and goes on routing into it while the listener
        keeps queueing (a read at most ``BURST_GAP_SECONDS`` after the queue ran dry),
        for up to ``HOLD_SECONDS``. In a burst over many dialogs a
        dialog's next message can be hundreds of notifications away, further than one
        read of the LISTEN connection; held this way, its sockets get its messages in
        one send, and the client one read, instead of one each.

        No garbage collection runs while a batch is open (``gctune.hold``; released across
        a ``message_ref``'s database read): a collection never stands between a
        notification and its frames, and never walks what a burst allocates, which all
        dies when the burst ends.
        """
        queue = self.queue
        batch = self.batch
        while True:
            item = await queue.get()
            started = time.monotonic()
            batch.open()
            self._messages = 0
            self._hold_collections()
            try:
                await self._handle(*item)
                routed = 1
                deadline = started + BATCH_SECONDS
                while True:
                    while not queue.empty() and time.monotonic() < deadline:
                        await self._handle(*queue.get_nowait())
                        routed += 1
                    if routed < BURST_NOTIFICATIONS or time.monotonic() >= started + HOLD_SECONDS:
                        break
                    batch.pause()
                    await asyncio.sleep(0)
                    if queue.empty():
                        await asyncio.sleep(BURST_GAP_SECONDS)
                    batch.resume()
                    if queue.empty():
                        break
                    deadline = time.monotonic() + BATCH_SECONDS
            finally:
                batch.flush()
                self._time_batch()
                self.router.broadcasts.flush()
                self._release_collections()
            await asyncio.sleep(0)

    def _hold_collections(self) -> None:
        if self._collecting is None:
            self._collecting = gctune.hold()  # see ws_gateway/gctune.py

    def _release_collections(self) -> None:
        """Collections as they were before the batch."""
        if self._collecting is not None:
            gctune.release(self._collecting)
            self._collecting = None

    def _time_batch(self) -> None:
        """Stages of the batch's messages, now that their frames are with the kernel."""
        timed, self._timed = self._timed, []
        if not timed:
            return
        flushed = time.time()
        observe = self.stats.stages.observe
        for received, taken, parsed in timed:
            observe(taken - received, GatewayStage.QUEUE)
            observe(parsed - taken, GatewayStage.PARSE)
            observe(flushed - parsed, GatewayStage.DELIVER)

    async def _handle(self, payload: str, received: float) -> None:
        self.stats.notifications += 1
        taken = time.time()
        try:
            event = parse_event(payload)
        except BadPayloadError as exc:
            self.stats.bad_notifications += 1
            log.warning("dropped malformed notification (%s): %r", exc, payload[:120])
            return
        except Exception:
            # A parser bug, not a bad payload: this task is the only one that delivers, so
            # it logs the traceback and goes on rather than end and silence every socket.
            self.stats.bad_notifications += 1
            log.exception("dropped a notification the parser failed on: %r", payload[:120])
            return
        if isinstance(event, DialogEvent):
            self.workspace.route(event)
            return
        if isinstance(event, TeamEvent):
            self.workspace.team_changed(event)
            return
        if isinstance(event, PresenceEvent):
            self.presence.on_notification(event)
            return
        created: float | None = None
        if event.kind == FrameType.MESSAGE:
            self._messages += 1
            if self._messages <= BURST_NOTIFICATIONS or self._messages % TIME_ONE_IN == 0:
                self._timed.append((received, taken, time.time()))
                created = unix_time(event.created_at)
                if created is not None:
                    self.stats.stages.observe(max(received - created, 0.0), GatewayStage.NOTIFY)
        try:
            if event.kind == FrameType.MESSAGE_REF:
                # Reading the row awaits, and other tasks (replays, joins) run meanwhile: what
                # this batch holds goes out first, and their writes must not be held, since
                # their pacing waits on real writes.
                self.batch.flush()
                self._release_collections()  # an await of unknown length
                try:
                    await self.router.resolve_and_route(event)
                finally:
                    self.batch.open()
                    self._hold_collections()
            else:
                self.router.route(event)
                if created is not None:
                    self.stats.observe_lag(time.time() - created)
        except Exception:
            log.exception("failed to route %s for dialog %d", event.kind, event.dialog_id)
