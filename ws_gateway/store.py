"""The gateway's queries, on a small asyncpg pool (the LISTEN connection is separate).

Invariant: the gateway only reads; and a socket's handshake is one query (one
round trip), which authorises it and reads its first replay page together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from replyx import security

# Each handshake query below returns one row per message of the first replay page
# (rows with seq > since ($3), or > last_seq when the client gave no since (NULL), in
# seq order, at most $4), each with the dialog's last_seq; a single row with a NULL seq
# when the page is empty; no row when the credential is refused. One statement is one
# snapshot, so last_seq and the page agree with each other.

# Operator: the dialog must belong to one of the operator's assistants. No row: refused.
_ADMIN_OPENING = """
    SELECT d.last_seq, p.seq, p.frame
      FROM dialogs d JOIN assistants a ON a.id = d.assistant_id
      LEFT JOIN LATERAL (
          SELECT m.seq, replyx_message_json(m) AS frame FROM messages m
           WHERE m.dialog_id = d.id AND m.seq > COALESCE($3::bigint, d.last_seq)
           ORDER BY m.seq LIMIT $4
      ) p ON true
     WHERE d.id = $1 AND a.user_id = $2
     ORDER BY p.seq
"""
# Widget: the guest token names exactly one dialog; the origin rule needs its domains.
# The page is read only when that dialog is the one asked for ($2).
_GUEST_OPENING = """
    SELECT d.id, d.assistant_id, a.domains, d.last_seq, p.seq, p.frame
      FROM dialogs d JOIN assistants a ON a.id = d.assistant_id
      LEFT JOIN LATERAL (
          SELECT m.seq, replyx_message_json(m) AS frame FROM messages m
           WHERE m.dialog_id = d.id AND d.id = $2
             AND m.seq > COALESCE($3::bigint, d.last_seq)
           ORDER BY m.seq LIMIT $4
      ) p ON true
     WHERE d.guest_token_hash = $1
     ORDER BY p.seq
"""
# Site: the token names an assistant; the dialog must be one of its dialogs (else d.* NULL).
_SITE_OPENING = """
    SELECT a.id AS assistant_id, d.id AS dialog_id, d.last_seq, p.seq, p.frame
      FROM assistants a
      LEFT JOIN dialogs d ON d.id = $2 AND d.assistant_id = a.id
      LEFT JOIN LATERAL (
          SELECT m.seq, replyx_message_json(m) AS frame FROM messages m
           WHERE m.dialog_id = d.id AND m.seq > COALESCE($3::bigint, d.last_seq)
           ORDER BY m.seq LIMIT $4
      ) p ON true
     WHERE a.site_token_hash = $1
     ORDER BY p.seq
"""
_LAST_SEQ = "SELECT last_seq FROM dialogs WHERE id = $1"
_MESSAGES_AFTER = """
    SELECT m.seq, replyx_message_json(m) FROM messages m
     WHERE m.dialog_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3
"""
_MESSAGE_BY_REF = """
    SELECT replyx_message_json(m) FROM messages m
     WHERE m.id = $1 AND m.dialog_id = $2 AND m.seq = $3
"""
_OPERATOR_DIALOG_IDS = """
    SELECT d.id FROM dialogs d JOIN assistants a ON a.id = d.assistant_id
     WHERE a.user_id = $1 AND d.id = ANY($2::bigint[])
"""


@dataclass(frozen=True, slots=True)
class Opening:
    """What a socket opens with: its dialog's last seq and the first page of its replay."""

    last_seq: int
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
        int(rows[0]["last_seq"]),
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
        self, dialog_id: int, user_id: int, since: int | None, limit: int
    ) -> Opening | None:
        """The opening of an operator's socket; None when the dialog is not theirs."""
        rows = await self.pool.fetch(_ADMIN_OPENING, dialog_id, user_id, since, limit)
        return _opening(rows) if rows else None

    async def guest_opening(
        self, guest_token: str, dialog_id: int, since: int | None, limit: int
    ) -> GuestDialog | None:
        """The dialog a guest token names (None: no such token), with the opening."""
        rows = await self.pool.fetch(
            _GUEST_OPENING, security.token_hash(guest_token), dialog_id, since, limit
        )
        if not rows:
            return None
        first = rows[0]
        return GuestDialog(
            first["id"], first["assistant_id"], list(first["domains"]),
            _opening(rows) if first["id"] == dialog_id else None,
        )

    async def site_opening(
        self, site_token: str, dialog_id: int, since: int | None, limit: int
    ) -> tuple[bool, Opening | None]:
        """(token valid, the opening when the dialog belongs to the token's assistant)."""
        rows = await self.pool.fetch(
            _SITE_OPENING, security.token_hash(site_token), dialog_id, since, limit
        )
        if not rows:
            return False, None
        return True, _opening(rows) if rows[0]["dialog_id"] is not None else None

    async def last_seq(self, dialog_id: int) -> int:
        return int(await self.pool.fetchval(_LAST_SEQ, dialog_id) or 0)

    async def messages_after(
        self, dialog_id: int, since: int, limit: int
    ) -> list[tuple[int, bytes]]:
        rows = await self.pool.fetch(_MESSAGES_AFTER, dialog_id, since, limit)
        return [(row[0], row[1].encode()) for row in rows]

    async def message_by_ref(self, dialog_id: int, seq: int, message_id: int) -> bytes | None:
        rendered = await self.pool.fetchval(_MESSAGE_BY_REF, message_id, dialog_id, seq)
        return rendered.encode() if rendered is not None else None

    async def operator_dialog_ids(self, user_id: int, dialog_ids: list[int]) -> set[int]:
        rows = await self.pool.fetch(_OPERATOR_DIALOG_IDS, user_id, dialog_ids)
        return {row[0] for row in rows}
