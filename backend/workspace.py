"""The operator's workspace in the database: teams, read state, and the dialog list.

Every statement here is one round trip. Read state is written with a plain
UPDATE, as psql would: migration 0005's triggers keep it forward-only, refuse a
seq past ``last_seq``, keep ``unread`` and send the ``read`` and ``dialog``
events. The list pages by ``activity`` (unique, newest first) with one index
range per assistant of the operator, never a sort over all of a tenant's dialogs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database
from backend.store import THEIR_DIALOG, Principal

Side = Literal["operator", "visitor"]

#: A CHECK violation (the read-state trigger refuses a seq past last_seq).
_CHECK_VIOLATION = "23514"


class ReadPastEndError(Exception):
    """The seq is past the dialog's last message."""


class NotATeamMemberError(Exception):
    """remove-operator for a user who is not on the team (or is its owner)."""


@dataclass(frozen=True)
class DialogPage:
    dialogs: list[str]  # rendered `dialog` entries (JSON text), newest activity first
    total: int
    next_before: int | None  # the cursor of the next (older) page; None: this was the last


def _mark_read_sql(side: Side, source: str) -> str:
    # Built once from constants (the two sides and THEIR_DIALOG), never from input.
    column = f"{side}_read_seq"
    return (f"UPDATE dialogs SET {column} = :seq WHERE id = (SELECT d.id {source})"  # noqa: S608
            f" RETURNING {column}")


_MARK_READ = {
    (kind, side): text(_mark_read_sql(side, source))
    for kind, source in THEIR_DIALOG.items()
    for side in ("operator", "visitor")
}


async def mark_read(
    db: Database, principal: Principal, dialog_id: int, side: Side, seq: int
) -> int | None:
    """Move one side's read seq forward to ``seq``; the read seq after it, ``None`` if the
    dialog is not the principal's. A lower seq changes nothing; one past the end raises."""
    try:
        async with db.engine.begin() as conn:
            now = await conn.scalar(
                _MARK_READ[principal.kind, side], {**principal.params(dialog_id), "seq": seq}
            )
    except IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) == _CHECK_VIOLATION:
            raise ReadPastEndError(dialog_id) from None
        raise
    return None if now is None else int(now)


_PAGE = text(
    """
    SELECT replyx_dialog_json(d), d.activity
      FROM assistant_operators o
     CROSS JOIN LATERAL (
            SELECT id FROM dialogs
             WHERE assistant_id = o.assistant_id AND activity < :before
             ORDER BY activity DESC LIMIT :limit) page
      JOIN dialogs d ON d.id = page.id
     WHERE o.user_id = :user_id
     ORDER BY d.activity DESC
     LIMIT :limit
    """
)
_TOTAL = text(
    "SELECT count(*) FROM assistant_operators o JOIN dialogs d ON d.assistant_id = o.assistant_id"
    " WHERE o.user_id = :user_id"
)


async def dialog_page(
    session: AsyncSession, user_id: int, before: int | None, limit: int
) -> DialogPage:
    """Dialogs of every assistant the operator works on, newest activity first."""
    params = {"user_id": user_id, "before": before or 2**63 - 1, "limit": limit}
    rows = (await session.execute(_PAGE, params)).all()
    total = int(await session.scalar(_TOTAL, {"user_id": user_id}) or 0)
    next_before = int(rows[-1][1]) if len(rows) == limit else None
    return DialogPage([row[0] for row in rows], total, next_before)


async def add_operator(session: AsyncSession, assistant_id: int, user_id: int) -> bool:
    """Put a user on an assistant's team; False if they already were."""
    added = await session.scalar(
        text("INSERT INTO assistant_operators (assistant_id, user_id) VALUES (:a, :u)"
             " ON CONFLICT DO NOTHING RETURNING true"),
        {"a": assistant_id, "u": user_id},
    )
    await session.commit()
    return bool(added)


async def remove_operator(session: AsyncSession, assistant_id: int, user_id: int) -> None:
    """Take a member off the team; their open sockets of the assistant close with 4001.

    The owner stays: an assistant without its owner on the team would have nobody who
    may add anyone back.
    """
    removed = await session.scalar(
        text("DELETE FROM assistant_operators o USING assistants a"
             " WHERE o.assistant_id = :a AND o.user_id = :u AND a.id = o.assistant_id"
             " AND a.user_id <> :u RETURNING true"),
        {"a": assistant_id, "u": user_id},
    )
    await session.commit()
    if not removed:
        raise NotATeamMemberError(f"user {user_id} is not a member of assistant {assistant_id}"
                                  " (the owner cannot be removed)")
