"""The router's catch-up races, made deterministic with an in-memory store (a pure unit).

The fault tests in ``test_faults.py`` hit these windows only by luck; here the store
answers a catch-up query when the test says so, so the interleaving is exact.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from tests.raw_socket import server_payloads
from ws_gateway.events import Event
from ws_gateway.metrics import Stats
from ws_gateway.replay import Page
from ws_gateway.router import REPLAY_PAGE, Router

DIALOG = 7


def message(seq: int, text: str = "") -> bytes:
    return orjson.dumps({
        "type": "message", "dialog_id": DIALOG, "seq": seq, "id": 100 + seq,
        "sender": "visitor", "text": text or f"m{seq}", "created_at": "2030-01-01T00:00:00+00:00",
    })


def payload_of(frame: bytes) -> dict[str, Any]:
    (payload,) = server_payloads(frame)
    return orjson.loads(payload)


class Store:
    """The committed rows of one dialog; a query takes its snapshot when it is called."""

    def __init__(self) -> None:
        self.rows: dict[int, bytes] = {}
        self.gate: asyncio.Event | None = None  # when set up, queries wait for it
        self.queries = 0
        self.ref_failures = 0
        self.ref_error: type[Exception] = asyncpg.exceptions.ConnectionDoesNotExistError

    def commit(self, seq: int) -> None:
        self.rows[seq] = message(seq)

    @staticmethod
    def is_unavailable(exc: BaseException) -> bool:
        return isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError)

    async def last_seq(self, dialog_id: int) -> int:
        return max(self.rows, default=0)

    async def messages_after(
        self, dialog_id: int, since: int, limit: int, max_bytes: int = 1 << 30
    ) -> list[Any]:
        self.queries += 1
        snapshot = [(seq, self.rows[seq]) for seq in sorted(self.rows) if seq > since][:limit]
        if self.gate is not None:
            await self.gate.wait()
        return snapshot

    async def message_by_ref(self, dialog_id: int, seq: int, message_id: int) -> bytes | None:
        if self.ref_failures:
            self.ref_failures -= 1
            raise self.ref_error("the row could not be read")
        return self.rows.get(seq)


class Socket:
    kind = "admin"
    dialog_id = DIALOG

    def __init__(self) -> None:
        self.sent_seq = 0
        self.buffer: list[tuple[int, int, bytes]] | None = None
        self.frames: list[dict[str, Any]] = []

    def write_frame(self, frame: bytes) -> bool:
        self.frames.append(payload_of(frame))
        return True

    async def drained(self) -> None:
        await asyncio.sleep(0)

    @property
    def is_open(self) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed {code}")

    @property
    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames if f["type"] == "message"]


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


async def join(router: Router, store: Store, sock: Socket, since: int | None) -> None:
    """As a handshake does: register, then one query (last seq and the first page), then join."""
    mark = router.register(sock)
    start = await store.last_seq(DIALOG) if since is None else since
    page = await store.messages_after(DIALOG, start, REPLAY_PAGE)
    await router.join(sock, start, Page(mark, page))


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def router(store: Store) -> Router:
    return Router(store, Stats())  # type: ignore[arg-type]


@pytest.mark.gen_test(timeout=10)
async def test_commit_between_a_joins_snapshot_and_a_new_listen_is_not_missed(
    store: Store, router: Router
) -> None:
    """A socket joins while the listener is down. Its replay query takes its snapshot
    (seq 1..5); seq 6 commits; the listener comes back (so 6 is never notified) while
    the replay is still on its way. The socket must still get 6, without waiting for 7."""
    for seq in range(1, 6):
        store.commit(seq)
    store.gate = asyncio.Event()
    sock = Socket()
    join_ = asyncio.ensure_future(join(router, store, sock, since=0))
    await until(lambda: store.queries == 1)
    store.commit(6)
    router.resync_all()  # the listener reconnected
    store.gate.set()
    await asyncio.wait_for(join_, 5)
    assert sock.seqs == [1, 2, 3, 4, 5, 6]
    assert sock.frames[-1] == {"type": "ready", "dialog_id": DIALOG, "last_seq": 6}
    assert sock.buffer is None


@pytest.mark.gen_test(timeout=10)
async def test_unreadable_message_ref_is_caught_up_from_the_database(
    store: Store, router: Router
) -> None:
    """A big message's row cannot be read when its ``message_ref`` arrives (the pool lost
    its connection): the socket catches up from the database instead of losing it."""
    for seq in range(1, 4):
        store.commit(seq)
    sock = Socket()
    await join(router, store, sock, since=0)
    store.commit(4)
    store.ref_failures = 1
    await router.resolve_and_route(Event("message_ref", DIALOG, 4, 104))
    await until(lambda: sock.buffer is None and sock.sent_seq == 4)
    assert sock.seqs == [1, 2, 3, 4]
    # Live again: the next notification goes straight out.
    store.commit(5)
    router.route(Event("message", DIALOG, 5, 105, message(5), None))
    assert sock.seqs == [1, 2, 3, 4, 5]
    assert router.resyncing == 0


@pytest.mark.gen_test(timeout=10)
async def test_a_long_replay_waits_for_the_socket_between_chunks(
    store: Store, router: Router
) -> None:
    """A replay larger than ``replay_chunk`` waits for the socket to drain between chunks."""
    router.replay_chunk = 10_000
    text = "ж" * 3000  # 6000 bytes a message
    for seq in range(1, 11):
        store.rows[seq] = message(seq, text)
    drains: list[int] = []

    class Counting(Socket):
        async def drained(self) -> None:
            drains.append(self.sent_seq)
            await asyncio.sleep(0)

    sock = Counting()
    await join(router, store, sock, since=0)
    assert sock.seqs == list(range(1, 11))
    assert drains == [2, 4, 6, 8, 10]


@pytest.mark.gen_test(timeout=10)
async def test_any_failure_to_read_a_message_ref_is_a_lost_notification(
    store: Store, router: Router
) -> None:
    """Not only a lost connection: a cancelled or failed query must not drop the message."""
    store.commit(1)
    sock = Socket()
    await join(router, store, sock, since=0)
    store.commit(2)
    store.ref_failures = 1
    store.ref_error = asyncpg.exceptions.QueryCanceledError
    await router.resolve_and_route(Event("message_ref", DIALOG, 2, 102))
    await until(lambda: sock.buffer is None and sock.sent_seq == 2)
    assert sock.seqs == [1, 2]


@pytest.mark.gen_test(timeout=10)
async def test_a_hole_in_the_database_does_not_stall_the_dialog(
    store: Store, router: Router
) -> None:
    """A row deleted with the append-only trigger disabled leaves seq 3 missing for good:
    the replay skips it, and live messages after it still go out."""
    for seq in (1, 2, 4):
        store.commit(seq)
    sock = Socket()
    await join(router, store, sock, since=0)
    assert sock.seqs == [1, 2, 4]
    store.commit(5)
    router.route(Event("message", DIALOG, 5, 105, message(5), None))
    assert sock.seqs == [1, 2, 4, 5]
    assert sock.buffer is None


@pytest.mark.gen_test(timeout=10)
async def test_a_message_routed_during_the_handshake_query_reaches_the_socket_once(
    store: Store, router: Router
) -> None:
    """Register-then-replay: the socket is in its dialog before the one handshake query
    begins, so a message committed and routed while that query runs is buffered. Once in
    the page too (committed before the snapshot) or only in the buffer, it goes out once."""
    for seq in range(1, 4):
        store.commit(seq)
    store.gate = asyncio.Event()
    sock = Socket()
    join_ = asyncio.ensure_future(join(router, store, sock, since=0))
    await until(lambda: store.queries == 1)  # snapshot taken: 1..3
    for seq in (4, 5):
        store.commit(seq)
        router.route(Event("message", DIALOG, seq, 100 + seq, message(seq), None))
    assert sock.frames == []  # buffered, not written ahead of the replay
    store.gate.set()
    await asyncio.wait_for(join_, 5)
    assert sock.seqs == [1, 2, 3, 4, 5]
    assert sock.frames[-1] == {"type": "ready", "dialog_id": DIALOG, "last_seq": 5}
    assert store.queries == 1  # nothing was missing: no second query


@pytest.mark.gen_test(timeout=10)
async def test_a_socket_refused_after_registering_gets_nothing(
    store: Store, router: Router
) -> None:
    """A socket registers before its credential is checked; refused, it is removed and
    whatever was routed meanwhile never reaches it."""
    sock = Socket()
    router.register(sock)
    store.commit(1)
    router.route(Event("message", DIALOG, 1, 101, message(1), None))
    router.remove(sock)
    assert sock.frames == []
    assert router.sockets_of(DIALOG) == set()
