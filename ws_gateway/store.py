"""The gateway's queries, on a small asyncpg pool (the LISTEN connection is separate)."""

from __future__ import annotations

import asyncio

import asyncpg

from replyx import security

# Operator: the dialog must belong to one of the operator's assistants.
_ADMIN_DIALOG = """
    SELECT d.id FROM dialogs d JOIN assistants a ON a.id = d.assistant_id
     WHERE d.id = $1 AND a.user_id = $2
"""
# Widget: the guest token names exactly one dialog; the origin rule needs its domains.
_GUEST_DIALOG = """
    SELECT d.id, d.assistant_id, a.domains FROM dialogs d
      JOIN assistants a ON a.id = d.assistant_id
     WHERE d.guest_token_hash = $1
"""
# Site: the token names an assistant; the dialog must be one of its dialogs.
_SITE_DIALOG = """
    SELECT a.id AS assistant_id,
           (SELECT d.id FROM dialogs d WHERE d.id = $2 AND d.assistant_id = a.id) AS dialog_id
      FROM assistants a WHERE a.site_token_hash = $1
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


class GuestDialog:
    __slots__ = ("assistant_id", "dialog_id", "domains")

    def __init__(self, dialog_id: int, assistant_id: int, domains: list[str]) -> None:
        self.dialog_id = dialog_id
        self.assistant_id = assistant_id
        self.domains = domains


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

    async def admin_dialog(self, dialog_id: int, user_id: int) -> bool:
        return await self.pool.fetchval(_ADMIN_DIALOG, dialog_id, user_id) is not None

    async def guest_dialog(self, guest_token: str) -> GuestDialog | None:
        row = await self.pool.fetchrow(_GUEST_DIALOG, security.token_hash(guest_token))
        if row is None:
            return None
        return GuestDialog(row["id"], row["assistant_id"], list(row["domains"]))

    async def site_dialog(self, site_token: str, dialog_id: int) -> tuple[bool, bool]:
        """(token valid, dialog belongs to the token's assistant)."""
        row = await self.pool.fetchrow(_SITE_DIALOG, security.token_hash(site_token), dialog_id)
        if row is None:
            return False, False
        return True, row["dialog_id"] is not None

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
