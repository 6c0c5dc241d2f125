"""The gateway's queries, on a small asyncpg pool (the LISTEN connection is separate).

Invariant: the gateway only reads; and a socket's handshake is one query (one
round trip), which authorises it and reads its first replay page together.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from replyx import security
from replyx.protocol import NOTIFY_CHANNEL

# Each handshake query below returns one row per message of the first replay page
# (rows with seq > since ($3), or > last_seq when the client gave no since (NULL), in
# seq order, at most $4 rows and, past the first row, at most $5 bytes of frames: pages
# are bounded in bytes, as a row may be ~200 KB. Only rows whose texts fit the budget are
# rendered (octet_length of a stored text does not detoast it), so a page query's work is
# bounded by the budget too, not by 500 huge rows), each with the dialog's last_seq;
# a single row with a NULL seq when the page is empty; no row when the credential is
# refused. One statement is one snapshot, so last_seq and the page agree with each other.

# Operator: the user must be an operator of the dialog's assistant. No row: refused.
_ADMIN_OPENING = """
    SELECT d.assistant_id, d.last_seq, d.operator_read_seq, d.visitor_read_seq, p.seq, p.frame
      FROM dialogs d JOIN assistant_operators o ON o.assistant_id = d.assistant_id
      LEFT JOIN LATERAL (
          SELECT seq, frame FROM (SELECT r.seq, r.frame,
                 sum(octet_length(r.frame)) OVER (ORDER BY r.seq) - octet_length(r.frame) AS ahead
            FROM (SELECT c.seq, replyx_message_json(m) AS frame
                    FROM (SELECT m.id, m.seq, sum(octet_length(m.text)) OVER (ORDER BY m.seq)
                                 - octet_length(m.text) AS text_ahead FROM messages m
                           WHERE m.dialog_id = d.id AND m.seq > COALESCE($3::bigint, d.last_seq)
                           ORDER BY m.seq LIMIT $4) c
                    JOIN messages m ON m.id = c.id WHERE c.text_ahead < $5) r) w
           WHERE w.ahead < $5
      ) p ON true
     WHERE d.id = $1 AND o.user_id = $2
     ORDER BY p.seq
"""
# An inbox's snapshot, in one statement (so one database snapshot): the operator's
# assistants, their newest dialogs (one index range per assistant), and the total.
_INBOX_SNAPSHOT = """
    WITH mine AS (SELECT assistant_id FROM assistant_operators WHERE user_id = $1),
    page AS (
        SELECT p.id, p.activity FROM mine CROSS JOIN LATERAL (
            SELECT id, activity FROM dialogs WHERE assistant_id = mine.assistant_id
             ORDER BY activity DESC LIMIT $2) p
         ORDER BY p.activity DESC LIMIT $2)
    SELECT (SELECT coalesce(array_agg(assistant_id), '{}') FROM mine),
           (SELECT count(*) FROM dialogs d JOIN mine USING (assistant_id)),
           (SELECT coalesce(array_agg(replyx_dialog_json(d) ORDER BY page.activity DESC), '{}')
              FROM page JOIN dialogs d ON d.id = page.id)
"""
# Widget: the guest token names exactly one dialog; the origin rule needs its domains.

# Widget: the guest token names exactly one dialog; the origin rule needs its domains.
# The page is read only when that dialog is the one asked for ($2).
_GUEST_OPENING = """
    SELECT d.id, d.assistant_id, a.domains, d.last_seq, d.operator_read_seq, d.visitor_read_seq,
           p.seq, p.frame
      FROM dialogs d JOIN assistants a ON a.id = d.assistant_id
      LEFT JOIN LATERAL (
          SELECT seq, frame FROM (SELECT r.seq, r.frame,
                 sum(octet_length(r.frame)) OVER (ORDER BY r.seq) - octet_length(r.frame) AS ahead
            FROM (SELECT c.seq, replyx_message_json(m) AS frame
                    FROM (SELECT m.id, m.seq, sum(octet_length(m.text)) OVER (ORDER BY m.seq)
                                 - octet_length(m.text) AS text_ahead FROM messages m
                           WHERE m.dialog_id = d.id AND d.id = $2
                             AND m.seq > COALESCE($3::bigint, d.last_seq)
                           ORDER BY m.seq LIMIT $4) c
                    JOIN messages m ON m.id = c.id WHERE c.text_ahead < $5) r) w
           WHERE w.ahead < $5
      ) p ON true
     WHERE d.guest_token_hash = $1
     ORDER BY p.seq
"""
# Site: the token names an assistant; the dialog must be one of its dialogs (else d.* NULL).
_SITE_OPENING = """
    SELECT a.id AS assistant_id, d.id AS dialog_id, d.last_seq, d.operator_read_seq,
           d.visitor_read_seq, p.seq, p.frame
      FROM assistants a
      LEFT JOIN dialogs d ON d.id = $2 AND d.assistant_id = a.id
      LEFT JOIN LATERAL (
          SELECT seq, frame FROM (SELECT r.seq, r.frame,
                 sum(octet_length(r.frame)) OVER (ORDER BY r.seq) - octet_length(r.frame) AS ahead
            FROM (SELECT c.seq, replyx_message_json(m) AS frame
                    FROM (SELECT m.id, m.seq, sum(octet_length(m.text)) OVER (ORDER BY m.seq)
                                 - octet_length(m.text) AS text_ahead FROM messages m
                           WHERE m.dialog_id = d.id AND m.seq > COALESCE($3::bigint, d.last_seq)
                           ORDER BY m.seq LIMIT $4) c
                    JOIN messages m ON m.id = c.id WHERE c.text_ahead < $5) r) w
           WHERE w.ahead < $5
      ) p ON true
     WHERE a.site_token_hash = $1
     ORDER BY p.seq
"""
_LAST_SEQ = "SELECT last_seq FROM dialogs WHERE id = $1"
_MESSAGES_AFTER = """
    SELECT seq, frame FROM (SELECT r.seq, r.frame,
           sum(octet_length(r.frame)) OVER (ORDER BY r.seq) - octet_length(r.frame) AS ahead
      FROM (SELECT c.seq, replyx_message_json(m) AS frame
              FROM (SELECT m.id, m.seq, sum(octet_length(m.text)) OVER (ORDER BY m.seq)
                           - octet_length(m.text) AS text_ahead FROM messages m
                     WHERE m.dialog_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3) c
              JOIN messages m ON m.id = c.id WHERE c.text_ahead < $4) r) w
     WHERE w.ahead < $4 ORDER BY seq
"""
_MESSAGE_BY_REF = """
    SELECT replyx_message_json(m) FROM messages m
     WHERE m.id = $1 AND m.dialog_id = $2 AND m.seq = $3
"""
_OPERATOR_DIALOG_IDS = """
    SELECT d.id FROM dialogs d JOIN assistant_operators o ON o.assistant_id = d.assistant_id
     WHERE o.user_id = $1 AND d.id = ANY($2::bigint[])
"""


@dataclass(frozen=True, slots=True)
class Opening:
    """What a socket opens with: its dialog's assistant and last seq, and the first page of
    its replay."""

    assistant_id: int
    last_seq: int
    #: (operator_read_seq, visitor_read_seq) in the same snapshot: sent after ``ready``.
    read_seqs: tuple[int, int]
    page: list[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class GuestDialog:
    dialog_id: int
    assistant_id: int
    domains: list[str]
    #: None when the token's dialog is not the one asked for.
    opening: Opening | None


def _opening(rows: list[asyncpg.Record]) -> Opening:
    return Opening(
        int(rows[0]["assistant_id"]),
        int(rows[0]["last_seq"]),
        (int(rows[0]["operator_read_seq"]), int(rows[0]["visitor_read_seq"])),
        [(row["seq"], row["frame"].encode()) for row in rows if row["seq"] is not None],
    )


class GatewayStore:
    """Read-only queries for authorisation and replay."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @staticmethod
    def is_unavailable(exc: BaseException) -> bool:
        """True for errors that mean "the database cannot be reached right now"."""
        return isinstance(
            exc,
            OSError
            | TimeoutError
            | asyncio.TimeoutError
            | asyncpg.exceptions.ConnectionDoesNotExistError
            | asyncpg.exceptions.CannotConnectNowError
            | asyncpg.exceptions.AdminShutdownError
            | asyncpg.exceptions.CrashShutdownError
            | asyncpg.exceptions.TooManyConnectionsError
            | asyncpg.exceptions.InterfaceError
            | asyncpg.exceptions.PostgresConnectionError,
        )

    # One round trip per handshake: each query below authorises the socket AND returns
    # its dialog's last seq AND the first replay page (see Router.register).

    async def admin_opening(
        self, dialog_id: int, user_id: int, since: int | None, limit: int, max_bytes: int
    ) -> Opening | None:
        """The opening of an operator's socket; None when the dialog is not theirs."""
        rows = await self.pool.fetch(_ADMIN_OPENING, dialog_id, user_id, since, limit, max_bytes)
        return _opening(rows) if rows else None

    async def guest_opening(
        self, guest_token: str, dialog_id: int, since: int | None, limit: int, max_bytes: int
    ) -> GuestDialog | None:
        """The dialog a guest token names (None: no such token), with the opening."""
        rows = await self.pool.fetch(
            _GUEST_OPENING, security.token_hash(guest_token), dialog_id, since, limit, max_bytes
        )
        if not rows:
            return None
        first = rows[0]
        return GuestDialog(
            first["id"], first["assistant_id"], list(first["domains"]),
            _opening(rows) if first["id"] == dialog_id else None,
        )

    async def site_opening(
        self, site_token: str, dialog_id: int, since: int | None, limit: int, max_bytes: int
    ) -> tuple[bool, Opening | None]:
        """(token valid, the opening when the dialog belongs to the token's assistant)."""
        rows = await self.pool.fetch(
            _SITE_OPENING, security.token_hash(site_token), dialog_id, since, limit, max_bytes
        )
        if not rows:
            return False, None
        return True, _opening(rows) if rows[0]["dialog_id"] is not None else None

    async def inbox_snapshot(self, user_id: int, limit: int) -> tuple[list[int], int, list[str]]:
        """(the operator's assistants, their dialogs in total, the newest ``limit`` rendered)."""
        row = await self.pool.fetchrow(_INBOX_SNAPSHOT, user_id, limit)
        assert row is not None
        return list(row[0]), int(row[1]), list(row[2])

    async def existing_last_seq(self, dialog_id: int) -> int | None:
        """The dialog's last seq, or None when there is no such dialog."""
        value = await self.pool.fetchval(_LAST_SEQ, dialog_id)
        return None if value is None else int(value)

    async def assistant_domains(self, assistant_id: int) -> list[str]:
        """The page origins an assistant's widget may run on (empty: no such assistant)."""
        domains = await self.pool.fetchval(
            "SELECT domains FROM assistants WHERE id = $1", assistant_id)
        return list(domains or [])


    async def messages_after(
        self, dialog_id: int, since: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Rows with seq > ``since``: at most ``limit``, and past the first, ``max_bytes``."""
        rows = await self.pool.fetch(_MESSAGES_AFTER, dialog_id, since, limit, max_bytes)
        return [(row[0], row[1].encode()) for row in rows]

    async def message_by_ref(self, dialog_id: int, seq: int, message_id: int) -> bytes | None:
        rendered = await self.pool.fetchval(_MESSAGE_BY_REF, message_id, dialog_id, seq)
        return rendered.encode() if rendered is not None else None

    async def operator_dialog_ids(self, user_id: int, dialog_ids: list[int]) -> set[int]:
        rows = await self.pool.fetch(_OPERATOR_DIALOG_IDS, user_id, dialog_ids)
        return {row[0] for row in rows}


# -- presence (migration 0006; see ws_gateway/presence.py) ------------------------------------

#: One advisory lock serialises every presence change, so the totals published in
#: commit order are exact.
PRESENCE_LOCK = 0x7265706C7978  # "replyx"
_OPERATOR_TOTALS = """
    SELECT a, (SELECT count(DISTINCT po.user_id) FROM presence_operators po
                 JOIN gateways g ON g.id = po.gateway_id AND g.expires_at > now()
                WHERE po.assistant_id = a)
      FROM unnest($1::bigint[]) a
"""
_VISITOR_TOTALS = """
    SELECT d, EXISTS (SELECT 1 FROM presence_visitors pv
                        JOIN gateways g ON g.id = pv.gateway_id AND g.expires_at > now()
                       WHERE pv.dialog_id = d)
      FROM unnest($1::bigint[]) d
"""
_ALL_OPERATORS = """
    SELECT po.assistant_id, count(DISTINCT po.user_id) FROM presence_operators po
      JOIN gateways g ON g.id = po.gateway_id AND g.expires_at > now()
     GROUP BY 1
"""
_ALL_VISITORS = """
    SELECT DISTINCT pv.dialog_id FROM presence_visitors pv
      JOIN gateways g ON g.id = pv.gateway_id AND g.expires_at > now()
"""


class PresenceStore:
    """The presence tables, for :class:`ws_gateway.presence.Presence`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def register(self, gateway_id: uuid.UUID, name: str, ttl: float) -> None:
        await self.pool.execute(
            "INSERT INTO gateways (id, name, expires_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3))"
            " ON CONFLICT (id) DO UPDATE"
            " SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
            gateway_id, name, ttl,
        )

    async def heartbeat(self, gateway_id: uuid.UUID, ttl: float) -> bool:
        """Renew the lease; False when the row is gone (expired and swept, or a crash)."""
        return bool(await self.pool.fetchval(
            "UPDATE gateways SET heartbeat_at = now(),"
            " expires_at = now() + make_interval(secs => $2) WHERE id = $1 RETURNING true",
            gateway_id, ttl,
        ))

    async def linger(self, gateway_id: uuid.UUID, seconds: float) -> None:
        await self.pool.execute(
            "UPDATE gateways SET expires_at = least(expires_at, now() + make_interval(secs => $2))"
            " WHERE id = $1", gateway_id, seconds,
        )

    async def totals(self) -> tuple[int, list[tuple[int, int]], list[int]]:
        """Every live total, in one snapshot: (version, (assistant, operators online) pairs,
        the dialogs with a visitor)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            version = await conn.fetchval("SELECT v FROM presence_version") or 0
            operators = await conn.fetch(_ALL_OPERATORS)
            visitors = await conn.fetch(_ALL_VISITORS)
        return version, [(r[0], r[1]) for r in operators], [r[0] for r in visitors]

    async def publish(
        self, gateway_id: uuid.UUID, replace: bool,
        add_ops: Sequence[tuple[int, int]], del_ops: Sequence[tuple[int, int]],
        add_vis: Sequence[int], del_vis: Sequence[int], chunk: int,
    ) -> None:
        """Apply one gateway's changes and NOTIFY the new totals of every key they touched."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PRESENCE_LOCK)
            if replace:
                gone_ops = await conn.fetch(
                    "DELETE FROM presence_operators WHERE gateway_id = $1"
                    " RETURNING assistant_id, user_id", gateway_id)
                gone_vis = await conn.fetch(
                    "DELETE FROM presence_visitors WHERE gateway_id = $1 RETURNING dialog_id",
                    gateway_id)
                del_ops = [(r[0], r[1]) for r in gone_ops]
                del_vis = [r[0] for r in gone_vis]
            else:
                await conn.execute(
                    "DELETE FROM presence_operators WHERE gateway_id = $1"
                    " AND (assistant_id, user_id) IN"
                    " (SELECT * FROM unnest($2::bigint[], $3::bigint[]))",
                    gateway_id, [a for a, _ in del_ops], [u for _, u in del_ops])
                await conn.execute(
                    "DELETE FROM presence_visitors WHERE gateway_id = $1 AND dialog_id = ANY($2)",
                    gateway_id, list(del_vis))
            await conn.execute(
                "INSERT INTO presence_operators (gateway_id, assistant_id, user_id)"
                " SELECT $1, a, u FROM unnest($2::bigint[], $3::bigint[]) AS t(a, u)"
                " ON CONFLICT DO NOTHING",
                gateway_id, [a for a, _ in add_ops], [u for _, u in add_ops])
            await conn.execute(
                "INSERT INTO presence_visitors (gateway_id, dialog_id)"
                " SELECT $1, d FROM unnest($2::bigint[]) d ON CONFLICT DO NOTHING",
                gateway_id, list(add_vis))
            assistants = sorted({a for a, _ in [*add_ops, *del_ops]})
            dialogs = sorted({*add_vis, *del_vis})
            await _notify_totals(conn, assistants, dialogs, chunk)

    async def sweep(self) -> int:
        """Delete gateways whose lease ended (their rows go with them); publish the totals."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PRESENCE_LOCK)
            dead = await conn.fetch("SELECT id FROM gateways WHERE expires_at <= now()")
            if not dead:
                return 0
            ids = [r[0] for r in dead]
            assistants = [r[0] for r in await conn.fetch(
                "SELECT DISTINCT assistant_id FROM presence_operators WHERE gateway_id = ANY($1)",
                ids)]
            dialogs = [r[0] for r in await conn.fetch(
                "SELECT DISTINCT dialog_id FROM presence_visitors WHERE gateway_id = ANY($1)", ids)]
            await conn.execute("DELETE FROM gateways WHERE id = ANY($1)", ids)
            await _notify_totals(conn, assistants, dialogs, 200)
            return len(ids)


async def _notify_totals(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    assistants: list[int], dialogs: list[int], chunk: int,
) -> None:
    operators = [list(r) for r in await conn.fetch(_OPERATOR_TOTALS, assistants)]
    visitors = [list(r) for r in await conn.fetch(_VISITOR_TOTALS, dialogs)]
    version = await conn.fetchval(
        "INSERT INTO presence_version (id, v) VALUES (1, 1)"
        " ON CONFLICT (id) DO UPDATE SET v = presence_version.v + 1 RETURNING v")
    for start in range(0, max(len(operators), len(visitors)), chunk):
        payload = orjson.dumps({
            "type": "presence", "version": version,
            "operators": operators[start:start + chunk],
            "visitors": visitors[start:start + chunk],
        }).decode()
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
