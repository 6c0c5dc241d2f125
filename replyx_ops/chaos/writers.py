"""The writers: HTTP posts through the API as operator, site and visitor, and INSERTs
from a SQL connection of their own, with rolled-back transactions mixed in.

Every text is unique and recorded with its outcome in the :class:`WriteLog`:
``acked`` (201, or COMMIT returned), ``unknown`` (the request or the COMMIT
failed in flight, as when a worker is killed mid-request: it may or may not have
committed) and ``rolled_back`` (ROLLBACK was sent, or COMMIT never was). The
checker proves that every ``acked`` text is in the database and that no
``rolled_back`` text ever reached the database or a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from replyx_ops.bench.servers import Tenant

#: Over the NOTIFY payload limit (8000 bytes): the gateway must read these rows by reference.
BIG_HTTP = (9_000, 30_000)  # the API takes at most 32 KiB of text
BIG_SQL = (9_000, 120_000)


@dataclass
class WriteLog:
    acked: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    rolled_back: set[str] = field(default_factory=set)
    refused: dict[str, int] = field(default_factory=dict)  # HTTP status / error → count
    by_writer: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.refused[key] = self.refused.get(key, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "acked": len(self.acked), "unknown": len(self.unknown),
            "rolled_back": len(self.rolled_back), "by_writer": dict(self.by_writer),
            "failures": dict(sorted(self.refused.items())),
        }


class Writer:
    """A loop that writes until stopped; subclasses write one batch per :meth:`step`."""

    name = "writer"

    def __init__(self, log: WriteLog, rng: random.Random, rate: float, prefix: str) -> None:
        self.log = log
        self.rng = rng
        self.rate = rate
        self.prefix = prefix
        self.serial = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def text(self, big: tuple[int, int] | None = None) -> str:
        self.serial += 1
        text = f"{self.prefix}-{self.name}-{self.serial}"
        if big is not None and self.rng.random() < 0.03:
            text += " " + "x" * self.rng.randint(*big)
        return text

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 20)

    async def _run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await self.step()
            await asyncio.sleep(max(0.0, self.rng.expovariate(self.rate)
                                    - (time.monotonic() - started)))

    async def step(self) -> None:
        raise NotImplementedError


class HttpWriter(Writer):
    """Posts as the operator, the site integration or the visitor (widget dialogs)."""

    name = "http"

    def __init__(self, log: WriteLog, rng: random.Random, rate: float, prefix: str,
                 base_url: str, tenant: Tenant, dialog_ids: list[int], operator_token: str
                 ) -> None:
        super().__init__(log, rng, rate, prefix)
        self.base_url = base_url
        self.tenant = tenant
        self.dialog_ids = dialog_ids
        self.operator_token = operator_token
        self.client = AsyncHTTPClient(force_instance=True, max_clients=32)
        # The newest seq a 201 answered with, per dialog: what a reader marks as read.
        self.seen: dict[int, int] = {}

    def request(self, dialog_id: int, text: str | None) -> tuple[str, HTTPRequest]:
        """A message post (or, with ``text`` None, a typing event) by a random sender."""
        who = self.rng.choice(("operator", "visitor" if dialog_id in self.tenant.guest_tokens
                               else "site"))
        headers = {"Content-Type": "application/json"}
        what = "messages" if text is not None else "typing"
        if who == "operator":
            path = f"/api/dialogs/{dialog_id}/{what}"
            headers["Authorization"] = f"Bearer {self.operator_token}"
        elif who == "visitor":
            path = f"/api/widget/dialogs/{dialog_id}/{what}"
            headers["Authorization"] = f"Bearer {self.tenant.guest_tokens[dialog_id]}"
            headers["Origin"] = Tenant.ORIGIN
        else:
            path = self.tenant.post_path(dialog_id).replace("/messages?", f"/{what}?")
        body = orjson.dumps({"text": text} if text is not None else {})
        return who, HTTPRequest(self.base_url + path, method="POST", body=body, headers=headers,
                                connect_timeout=5, request_timeout=15)

    async def post(self, dialog_id: int) -> None:
        text = self.text(BIG_HTTP)
        who, request = self.request(dialog_id, text)
        key = f"http-{who}"
        self.log.by_writer[key] = self.log.by_writer.get(key, 0) + 1
        try:
            response = await self.client.fetch(request, raise_error=False)
        except (OSError, HTTPClientError, TimeoutError) as exc:
            self.log.unknown.add(text)
            self.log.count(f"http {type(exc).__name__}")
            return
        if response.code == 201:
            self.log.acked.add(text)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                seq = int(orjson.loads(response.body)["seq"])
                self.seen[dialog_id] = max(seq, self.seen.get(dialog_id, 0))
        elif response.code >= 500 or response.code == 599:
            # 502 from nginx when a worker died mid-request: it may have committed.
            self.log.unknown.add(text)
            self.log.count(f"http {response.code}")
        else:
            # Refused (4xx): never committed, so it must never appear anywhere.
            self.log.rolled_back.add(text)
            self.log.count(f"http {response.code}")

    async def step(self) -> None:
        draw = self.rng.random()
        if draw < 0.1:
            await self.typing(self.rng.choice(self.dialog_ids))
        elif draw < 0.18 and self.seen:
            await self.read(self.rng.choice(sorted(self.seen)))
        else:
            await self.post(self.rng.choice(self.dialog_ids))

    async def read(self, dialog_id: int) -> None:
        """The operator (or the visitor) marks the dialog read up to a seq it has seen."""
        seq = self.seen[dialog_id]
        headers = {"Content-Type": "application/json"}
        if dialog_id in self.tenant.guest_tokens and self.rng.random() < 0.5:
            path = f"/api/widget/dialogs/{dialog_id}/read"
            headers["Authorization"] = f"Bearer {self.tenant.guest_tokens[dialog_id]}"
            headers["Origin"] = Tenant.ORIGIN
        else:
            path = f"/api/dialogs/{dialog_id}/read"
            headers["Authorization"] = f"Bearer {self.operator_token}"
        self.log.by_writer["http-read"] = self.log.by_writer.get("http-read", 0) + 1
        request = HTTPRequest(self.base_url + path, method="POST", headers=headers,
                              body=orjson.dumps({"seq": seq}), connect_timeout=5,
                              request_timeout=15)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except (OSError, HTTPClientError, TimeoutError) as exc:
            self.log.count(f"read {type(exc).__name__}")
            return
        if response.code >= 300:
            self.log.count(f"read {response.code}")

    async def typing(self, dialog_id: int) -> None:
        """An ephemeral typing event: not stored, no seq; only its dialog may see it."""
        _, request = self.request(dialog_id, None)
        self.log.by_writer["http-typing"] = self.log.by_writer.get("http-typing", 0) + 1
        try:
            response = await self.client.fetch(request, raise_error=False)
        except (OSError, HTTPClientError, TimeoutError) as exc:
            self.log.count(f"typing {type(exc).__name__}")
            return
        if response.code >= 300:
            self.log.count(f"typing {response.code}")

    async def volley(self, count: int) -> None:
        """``count`` posts at once (so that a worker killed now is killed mid-request)."""
        await asyncio.gather(*(self.post(self.rng.choice(self.dialog_ids))
                               for _ in range(count)), return_exceptions=True)

    async def stop(self) -> None:
        await super().stop()
        self.client.close()


class SqlWriter(Writer):
    """INSERTs as a batch job would, on a connection of its own, straight to Postgres.

    A transaction writes one to three rows, sometimes to two dialogs; some are rolled
    back on purpose. It reconnects (with a pause) when the server went away.
    """

    name = "sql"

    def __init__(self, log: WriteLog, rng: random.Random, rate: float, prefix: str,
                 dsn: str, dialog_ids: list[int], rollback_share: float = 0.2) -> None:
        super().__init__(log, rng, rate, prefix)
        self.dsn = dsn
        self.dialog_ids = dialog_ids
        self.rollback_share = rollback_share
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def step(self) -> None:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=3,
                    application_name="replyx-chaos-writer")
            except psycopg.Error:
                self.log.count("sql connect failed")
                await asyncio.sleep(0.5)
                return
        rows = [(self.rng.choice(self.dialog_ids), self.text(BIG_SQL))
                for _ in range(self.rng.randint(1, 3))]
        rollback = self.rng.random() < self.rollback_share
        texts = [text for _, text in rows]
        key = "sql-rollback" if rollback else "sql-commit"
        self.log.by_writer[key] = self.log.by_writer.get(key, 0) + len(rows)
        committing = False
        try:
            async with self.conn.cursor() as cur:
                await cur.execute("BEGIN")
                for dialog_id, text in rows:
                    await cur.execute(
                        "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, %s, %s)",
                        (dialog_id, self.rng.choice(("system", "assistant")), text))
                if rollback:
                    await cur.execute("ROLLBACK")
                    self.log.rolled_back.update(texts)
                    return
                committing = True
                await cur.execute("COMMIT")
            self.log.acked.update(texts)
        except psycopg.Error as exc:
            # Before COMMIT went out the transaction cannot have committed.
            (self.log.unknown if committing else self.log.rolled_back).update(texts)
            self.log.count(f"sql {type(exc).__name__}")
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None

    async def flood(self, dialog_ids: list[int], rows: int, size: int) -> int:
        """Commit ``rows`` large rows to each dialog in one transaction (a batch import), on a
        connection of its own; return the bytes written. Sized to overflow a stalled reader."""
        texts = {d: [self.text() + (" " + "f" * size if size else "") for _ in range(rows)]
                 for d in dialog_ids}
        flat = [t for ts in texts.values() for t in ts]
        committing = False
        try:
            async with await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=3,
                application_name="replyx-chaos-writer",
            ) as conn, conn.cursor() as cur:
                await cur.execute("BEGIN")
                await cur.executemany(
                    "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'system', %s)",
                    [(d, t) for d, ts in texts.items() for t in ts])
                committing = True
                await cur.execute("COMMIT")
        except psycopg.Error as exc:
            (self.log.unknown if committing else self.log.rolled_back).update(flat)
            self.log.count(f"flood {type(exc).__name__}")
            return 0
        self.log.acked.update(flat)
        self.log.by_writer["sql-flood"] = self.log.by_writer.get("sql-flood", 0) + len(flat)
        return sum(len(t) for t in flat)  # > 0: committed

    async def stop(self) -> None:
        await super().stop()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
