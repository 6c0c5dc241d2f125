"""The consumer (ws_gateway/consumer.py), as a pure unit below the real tests.

Every INSERT on messages also sends the new state of each dialog it wrote to, for
inboxes (once per statement, after its messages: migration 0007); a gateway with
no inbox open must not pay for parsing those (``replyx bench``'s many-dialogs
fan-out), yet must route them again the moment an inbox starts joining.

A burst over many dialogs arrives a read of the LISTEN connection at a time, each
dialog's next message a read or more later; the consumer keeps the batch open across
those reads, so a socket gets several frames per send, in order, and another task's
write to a socket with nothing held is not held meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any, cast

import orjson
import pytest

from tests.net import eventually
from tests.raw_socket import server_payloads
from ws_gateway import consumer as consumer_module
from ws_gateway.consumer import Consumer, WriteBatch
from ws_gateway.metrics import Stats
from ws_gateway.router import Router

# What the database's replyx_dialog_json renders (json_build_object's spacing).
DIALOG = ('{"type" : "dialog", "dialog_id" : 5, "assistant_id" : 2, "channel" : "site",'
          ' "created_at" : "2026-11-27T10:00:00.000000Z", "last_seq" : 1, "last_message" : null,'
          ' "operator_read_seq" : 0, "visitor_read_seq" : 0, "unread" : 1, "activity" : 9}')
MESSAGE = ('{"type":"message","dialog_id":5,"seq":1,"id":11,"sender":"visitor","text":"hi",'
           '"created_at":"2026-11-27T10:00:00.000000Z"}')


class Workspace:
    def __init__(self) -> None:
        self.inbox_joining = False

    def wants_dialogs(self) -> bool:
        return self.inbox_joining


def queued(consumer: Consumer) -> list[str]:
    return [payload for payload, _ in consumer.queue._queue]  # type: ignore[attr-defined]


def test_dialog_events_are_counted_but_not_queued_while_no_inbox_is_open() -> None:
    workspace, stats = Workspace(), Stats()
    consumer = Consumer(cast(Any, None), cast(Any, workspace), cast(Any, None), stats,
                        WriteBatch())
    consumer.put(DIALOG)
    consumer.put(MESSAGE)
    assert queued(consumer) == [MESSAGE]
    assert stats.notifications == 1  # the dialog event; the message is counted when routed

    workspace.inbox_joining = True  # an inbox is taking its snapshot: it needs every event
    consumer.put(DIALOG)
    assert queued(consumer) == [MESSAGE, DIALOG]
    # A dialog event spelled otherwise (hand-made, from psql) is always parsed and judged.
    workspace.inbox_joining = False
    other = DIALOG.replace('"type" : "dialog"', '"type":"dialog"')
    consumer.put(other)
    assert queued(consumer) == [MESSAGE, DIALOG, other]


class Writer:
    """One socket's write path: what reached it, one entry per write."""

    closing = False

    def __init__(self, dialog_id: int) -> None:
        self.dialog_id = dialog_id
        self.writes: list[bytes] = []
        self.collecting: list[bool] = []  # whether the garbage collector was on, per write

    def write(self, data: bytes) -> bool:
        self.writes.append(data)
        self.collecting.append(gc.isenabled())
        return True

    def fail(self, code: int, reason: str) -> None:
        raise AssertionError(f"failed {code}")

    def seqs(self) -> list[int]:
        return [orjson.loads(p)["seq"] for p in server_payloads(b"".join(self.writes))]


class Socket:
    """A live dialog socket as the router sees it, writing through the consumer's batch."""

    kind = "admin"
    is_open = True

    def __init__(self, dialog_id: int, batch: WriteBatch) -> None:
        self.dialog_id = dialog_id
        self.sent_seq = 0
        self.buffer: list[tuple[int, int, bytes]] | None = None
        self.writer = Writer(dialog_id)
        self.batch = batch

    def write_frame(self, frame: bytes) -> bool:
        return self.batch.write(self.writer, frame)


def wired(dialog_ids: range) -> tuple[Stats, Consumer, list[Socket]]:
    """A consumer and a router with one live socket on each of ``dialog_ids``."""
    batch, stats = WriteBatch(), Stats()
    router = Router(cast(Any, None), stats)
    consumer = Consumer(router, cast(Any, Workspace()), cast(Any, None), stats, batch)
    sockets = [Socket(dialog_id, batch) for dialog_id in dialog_ids]
    for sock in sockets:
        router.dialogs[sock.dialog_id] = {cast(Any, sock)}
    return stats, consumer, sockets


def message(dialog_id: int, seq: int) -> str:
    return orjson.dumps({
        "type": "message", "dialog_id": dialog_id, "seq": seq, "id": dialog_id * 1000 + seq,
        "sender": "system", "text": "burst", "created_at": "2026-12-07T10:00:00+00:00",
    }).decode()


@pytest.mark.parametrize("turns_between_reads", [1, 3])
@pytest.mark.gen_test(timeout=20)
async def test_a_burst_over_many_dialogs_reaches_each_socket_in_few_sends_and_in_order(
    turns_between_reads: int,
) -> None:
    """20 messages on each of 100 dialogs, one message per dialog per read of the LISTEN
    connection (as a burst committed in one transaction arrives), the reads one or a few turns
    of the loop apart (a busy Postgres delivers them later than the consumer's next turn): each
    socket gets its 20 frames in order, in a few sends. One batch per read would be 20 sends
    per socket. No garbage collection runs while the burst's batch is open (the burst's
    own objects all die when it ends), and collections are back on afterwards."""
    assert gc.isenabled()
    stats, consumer, sockets = wired(range(1, 101))
    consumer.start()
    try:
        for seq in range(1, 21):
            for sock in sockets:
                consumer.put(message(sock.dialog_id, seq))
            for _ in range(turns_between_reads):  # the listener's next read
                await asyncio.sleep(0)
        await eventually(lambda: all(len(s.writer.seqs()) == 20 for s in sockets),
                         "20 frames at every socket", timeout=10)
    finally:
        await consumer.stop()
    for sock in sockets:
        assert sock.writer.seqs() == list(range(1, 21)), sock.dialog_id
    sends = [len(sock.writer.writes) for sock in sockets]
    assert sum(sends) <= 5 * len(sockets), f"{sum(sends)} sends for {20 * len(sockets)} frames"
    assert stats.frames_sent == 2000
    # The burst's frames left while collections were off; they are on again.
    assert not any(on for sock in sockets for on in sock.writer.collecting)
    assert gc.isenabled()


def test_while_a_batch_is_paused_a_socket_with_nothing_held_is_written_at_once() -> None:
    """Other tasks run while a burst's batch is paused: a join's frames on another socket go
    out at once, and a frame for a socket with frames held waits behind them, in order."""
    batch = WriteBatch()
    held, other = Writer(1), Writer(2)
    batch.open()
    batch.write(held, b"first")
    batch.pause()
    batch.write(other, b"replay")
    batch.write(held, b"second")
    assert other.writes == [b"replay"]
    assert held.writes == []
    batch.resume()
    batch.write(other, b"routed")
    assert other.writes == [b"replay"]  # held again: the batch routes
    batch.flush()
    assert held.writes == [b"firstsecond"]
    assert other.writes == [b"replay", b"routed"]
    batch.write(held, b"later")  # no batch open: at once
    assert held.writes == [b"firstsecond", b"later"]


class RefRouter(Router):
    """Reads a message_ref's row as the real router does: an await (here a short sleep)."""

    def __init__(self, stats: Stats) -> None:
        super().__init__(cast(Any, None), stats)
        self.collecting_while_reading: list[bool] = []

    async def resolve_and_route(self, event: Any) -> None:
        self.collecting_while_reading.append(gc.isenabled())
        await asyncio.sleep(0.01)
        self.route(type(event)("message", event.dialog_id, event.seq, event.message_id,
                               message(event.dialog_id, event.seq).encode()))


@pytest.mark.gen_test(timeout=10)
async def test_collections_are_off_while_a_batch_routes_and_on_while_a_message_ref_is_read(
) -> None:
    """A batch routes with the garbage collector off (no collection between a notification and
    its frames), but a message_ref's database read, an await of unknown length, runs with it on;
    afterwards it is on."""
    assert gc.isenabled()
    batch, stats = WriteBatch(), Stats()
    router = RefRouter(stats)
    consumer = Consumer(router, cast(Any, Workspace()), cast(Any, None), stats, batch)
    sock = Socket(7, batch)
    router.dialogs[7] = {cast(Any, sock)}
    consumer.start()
    try:
        consumer.put(message(7, 1))
        consumer.put(orjson.dumps({"type": "message_ref", "dialog_id": 7, "seq": 2,
                                   "id": 7002}).decode())
        consumer.put(message(7, 3))
        await eventually(lambda: sock.writer.seqs() == [1, 2, 3], "seqs 1-3", timeout=2)
    finally:
        await consumer.stop()
    assert sock.writer.seqs() == [1, 2, 3]
    assert router.collecting_while_reading == [True]
    # 1 and 3 leave from the batch, collections off; 2 at the end of its read, outside it.
    assert sock.writer.collecting == [False, True, False]
    assert gc.isenabled()


@pytest.mark.gen_test(timeout=20)
async def test_a_burst_is_timed_by_sample_and_steady_traffic_in_full() -> None:
    """The stage and lag histograms take every message of a batch up to a burst's 64, then one
    in 16 (their clocks were a tenth of a burst's CPU); a small batch is timed in full, and
    every message is routed either way."""
    stats, consumer, sockets = wired(range(1, 9))
    for seq in range(1, 17):  # 128 messages queued at once: one batch
        for sock in sockets:
            consumer.put(message(sock.dialog_id, seq))

    def timed(stage: str) -> int:
        return sum(stats.stages.counts[stage])

    consumer.start()
    try:
        await eventually(lambda: all(len(s.writer.seqs()) == 16 for s in sockets),
                         "the burst at every socket", timeout=2)
        burst = timed("notify"), timed("deliver"), sum(stats.lag.counts[""])
        for sock in sockets[:5]:  # then steady traffic: a batch of five
            consumer.put(message(sock.dialog_id, 17))
        await eventually(lambda: timed("deliver") == burst[1] + 5, "five more timed",
                         timeout=2)
    finally:
        await consumer.stop()
    assert all(sock.writer.seqs() == list(range(1, 17)) for sock in sockets[5:])
    assert all(sock.writer.seqs() == list(range(1, 18)) for sock in sockets[:5])
    assert burst == (64 + 64 // 16,) * 3
    assert (timed("notify"), timed("queue"), timed("parse"), timed("deliver")) == (73,) * 4
    assert sum(stats.lag.counts[""]) == 73
    assert stats.last_lag is not None


@pytest.mark.gen_test(timeout=20)
async def test_a_payload_the_parser_fails_on_is_dropped_and_delivery_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The consumer is the one task that delivers: a parser bug (anything but BadPayloadError,
    as a TypeError once was for ``{"type":[]}``) costs that payload, logged with its
    traceback, and never the messages behind it."""
    parse = consumer_module.parse_event

    def buggy(payload: str) -> Any:
        if payload == "boom":
            raise TypeError("a bug in the parser")
        return parse(payload)

    monkeypatch.setattr(consumer_module, "parse_event", buggy)
    stats, consumer, sockets = wired(range(1, 2))
    consumer.start()
    try:
        consumer.put("boom")
        consumer.put(message(1, 1))
        await eventually(lambda: bool(sockets[0].writer.seqs()), "seq 1", timeout=2)
        consumer.put(message(1, 2))  # and the batch after it, too
        await eventually(lambda: len(sockets[0].writer.seqs()) == 2, "seq 2", timeout=2)
    finally:
        await consumer.stop()
    assert sockets[0].writer.seqs() == [1, 2]
    assert stats.bad_notifications == 1
    failed = [r for r in caplog.records if r.getMessage().startswith("dropped a notification")]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert failed[0].getMessage() == "dropped a notification the parser failed on: 'boom'"
