"""Group commit (backend/group_commit.py) on real Postgres: writes that arrive while a
worker's commits are in flight share one transaction, and each keeps its own outcome.

The lanes are made busy with slow statements (``pg_sleep``), so what arrives meanwhile
waits and goes as one batch: the test knows which writes share a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from backend import group_commit, metrics
from backend.db import WritePool
from backend.group_commit import GroupCommit
from replyx.pg import libpq_url
from tests.fix_apps import Api
from tests.fix_db import Tenant

TABLE = """
    CREATE TABLE IF NOT EXISTS group_commit_probe (
        id bigserial PRIMARY KEY, k int NOT NULL, v int NOT NULL CHECK (v >= 0), run text)
"""
INSERT = "INSERT INTO group_commit_probe (k, v, run) VALUES (%(k)s, %(v)s, %(run)s) RETURNING v"
SLOW = "SELECT pg_sleep(%(seconds)s)"


@pytest.fixture
def probe(sql: psycopg.Connection[Any], request: pytest.FixtureRequest) -> Iterator[str]:
    sql.execute(TABLE)
    yield request.node.name


@contextlib.asynccontextmanager
async def group_commit_on(database_url: str) -> AsyncIterator[GroupCommit]:
    pool = WritePool(libpq_url(database_url), {}, 8)
    try:
        yield GroupCommit(pool)
    finally:
        await pool.close()


def commits() -> tuple[float, float]:
    """(transactions, writes) committed so far, from the histogram /metrics shows."""
    count = total = 0.0
    for sample in metrics.COMMIT_WRITES.collect()[0].samples:
        if sample.name.endswith("_count"):
            count = sample.value
        elif sample.name.endswith("_sum"):
            total = sample.value
    return count, total


async def busy_lanes(group: GroupCommit, seconds: float) -> list[asyncio.Task[Any]]:
    """Fill every lane with a statement that takes ``seconds``."""
    tasks = [asyncio.ensure_future(group.fetchone(SLOW, {"seconds": seconds}, 0))
             for _ in range(group_commit.LANES)]
    await asyncio.sleep(0.05)
    return tasks


def stored(sql: psycopg.Connection[Any], run: str) -> list[tuple[int, int]]:
    rows = sql.execute("SELECT k, v FROM group_commit_probe WHERE run = %s ORDER BY id",
                       (run,)).fetchall()
    return [(k, v) for k, v in rows]


@pytest.mark.gen_test(timeout=30)
async def test_writes_that_wait_share_one_commit_in_dialog_order(
    database_url: str, sql: psycopg.Connection[Any], probe: str
) -> None:
    async with group_commit_on(database_url) as group:
        before = commits()
        slow = await busy_lanes(group, 0.3)
        keys = [3, 1, 3, 2, 1, 3]
        writes = [group.fetchone(INSERT, {"k": k, "v": n, "run": probe}, k)
                  for n, k in enumerate(keys)]
        rows = await asyncio.gather(*writes)
        await asyncio.gather(*slow)
        assert rows == [(n,) for n in range(len(keys))]
        after = commits()
        # The two slow statements alone, then the six in one transaction.
        assert (after[0] - before[0], after[1] - before[1]) == (3, 8)
        # Locks are taken in key order; within a key, arrival order is kept.
        assert stored(sql, probe) == [(1, 1), (1, 4), (2, 3), (3, 0), (3, 2), (3, 5)]


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_write_fails_alone_and_the_rest_of_its_batch_commits(
    database_url: str, sql: psycopg.Connection[Any], probe: str
) -> None:
    async with group_commit_on(database_url) as group:
        slow = await busy_lanes(group, 0.3)
        values = [0, 1, -1, 3, 4]  # -1 breaks the CHECK: the shared transaction is refused
        results = await asyncio.gather(
            *(group.fetchone(INSERT, {"k": 1, "v": v, "run": probe}, 1) for v in values),
            return_exceptions=True)
        await asyncio.gather(*slow)
        assert isinstance(results[2], psycopg.errors.CheckViolation)
        assert [r for n, r in enumerate(results) if n != 2] == [(0,), (1,), (3,), (4,)]
        assert stored(sql, probe) == [(1, 0), (1, 1), (1, 3), (1, 4)]


@pytest.mark.gen_test(timeout=30)
async def test_a_batch_whose_connection_breaks_is_not_run_again(
    database_url: str, sql: psycopg.Connection[Any], probe: str
) -> None:
    """Whether a broken connection's commit happened is unknown: every write of the batch
    fails (the API answers 503) and none runs a second time, which could store it twice."""
    async with group_commit_on(database_url) as group:
        slow = await busy_lanes(group, 0.3)
        writes = [group.fetchone(INSERT, {"k": 1, "v": v, "run": probe}, 1) for v in (0, 1)]
        writes.append(group.fetchone("SELECT pg_terminate_backend(pg_backend_pid())", {}, 2))
        results = await asyncio.gather(*writes, return_exceptions=True)
        await asyncio.gather(*slow)
        assert all(isinstance(r, psycopg.OperationalError) for r in results), results
        assert stored(sql, probe) == []
        # The lane is usable again: the broken connection was not given back to the pool.
        assert await group.fetchone(INSERT, {"k": 1, "v": 7, "run": probe}, 1) == (7,)


@pytest.mark.gen_test(timeout=60)
async def test_a_burst_of_posts_shares_commits_and_every_dialog_stays_gapless(
    api: Api, tenant: Tenant
) -> None:
    """Through the API: 200 messages at once on 5 dialogs all answer 201, fewer
    transactions than messages commit them, and each dialog's seqs run 1..40."""
    dialogs = [await api.site_dialog(tenant) for _ in range(5)]
    before = commits()
    await asyncio.gather(*(api.post_site(tenant, dialogs[n % 5], f"m{n}") for n in range(200)))
    after = commits()
    assert after[1] - before[1] == 200
    assert after[0] - before[0] < 200
    for dialog_id in dialogs:
        r = await api.request("GET", f"/api/dialogs/{dialog_id}/messages", token=tenant.token)
        assert r.code == 200
        assert [m["seq"] for m in r.body["messages"]] == list(range(1, 41))
