"""Every query the backend and the CLI make, as small async functions.

Most take an ORM session. The hot path (posting a message or a typing event) is one
Core statement on one connection, authorised inside the statement itself.

Messages are rendered by the database function ``replyx_message_json`` so the
HTTP API returns byte-for-byte the frame the gateway sends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import exists, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database, driver_sql
from backend.models import Assistant, AssistantOperator, Dialog, User
from replyx import security
from replyx.protocol import NOTIFY_CHANNEL


class EmailTakenError(Exception):
    pass


@dataclass(frozen=True)
class NewAssistant:
    assistant_id: int
    site_token: str
    domains: list[str]


@dataclass(frozen=True)
class NewDialog:
    dialog_id: int
    guest_token: str | None


async def create_user(session: AsyncSession, email: str, password: str) -> int:
    user = User(email=email.strip(), password_hash=security.hash_password(password))
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise EmailTakenError(email) from None
    return user.id


async def authenticate(session: AsyncSession, email: str, password: str) -> int | None:
    """The user's id when the password matches; the same work is done for unknown emails."""
    row = (
        await session.execute(
            select(User.id, User.password_hash).where(
                func.lower(User.email) == func.lower(email.strip())
            )
        )
    ).first()
    stored = row.password_hash if row else None
    # The read is over: the connection goes back to the pool before the slow part.
    await session.rollback()
    # scrypt takes ~50 ms of CPU and releases the GIL: off the event loop, other requests go on.
    if await asyncio.to_thread(security.verify_password, password, stored) and row is not None:
        user_id: int = row.id
        return user_id
    return None


# One attempt counted against an address. SET sees the row as it was, so both CASEs agree
# on whether the window had ended; an expired window starts over at this attempt.
_RESERVE_LOGIN = text(
    """
    INSERT INTO login_failures AS f (address, failures, window_start)
    VALUES (:address, 1, now())
    ON CONFLICT (address) DO UPDATE SET
        failures = CASE WHEN f.window_start <= now() - make_interval(secs => :window)
                        THEN 1 ELSE least(f.failures + 1, 1000000) END,
        window_start = CASE WHEN f.window_start <= now() - make_interval(secs => :window)
                            THEN now() ELSE f.window_start END
    RETURNING failures,
              extract(epoch FROM f.window_start + make_interval(secs => :window) - now())::float8
    """
)
_RELEASE_LOGIN = text(
    "UPDATE login_failures SET failures = failures - 1 WHERE address = :address AND failures > 0"
)
_FORGET_OLD_LOGINS = text(
    "DELETE FROM login_failures WHERE window_start < now() - make_interval(secs => :window)"
)


async def reserve_login_attempt(
    session: AsyncSession, address: str, max_failures: int, window: float
) -> float | None:
    """Count one login attempt from ``address``; the seconds to wait if it is over the limit.

    The attempt is counted before the password is checked, so a burst of guesses
    spread over every worker at once cannot get more than ``max_failures`` tries.
    A login that succeeds gives its attempt back (:func:`release_login_attempt`).
    """
    params = {"address": address, "window": float(window)}
    failures, remaining = (await session.execute(_RESERVE_LOGIN, params)).one()
    if failures == 1:
        # A new window began: a good moment to drop rows whose windows ended long ago.
        await session.execute(_FORGET_OLD_LOGINS, {"window": float(window)})
    await session.commit()
    if failures > max_failures:
        return max(float(remaining), 1.0)
    return None


async def release_login_attempt(session: AsyncSession, address: str) -> None:
    await session.execute(_RELEASE_LOGIN, {"address": address})
    await session.commit()


@dataclass(frozen=True)
class Bucket:
    """One rate limit as it applies to one caller: ``key`` names both (``guest:<hash>``)."""

    key: str
    rate: float
    burst: int


# What a bucket holds now: what was left, plus what flowed in since, up to the burst.
# now() is the transaction's start, which may precede a concurrent writer's updated_at.
_REFILLED = ("least(EXCLUDED.burst, b.tokens"
             " + EXCLUDED.rate * greatest(0, extract(epoch FROM now() - b.updated_at)))")
# Take one token from each bucket, creating full ones as needed, in one statement. The SET
# expressions all see the row as it was; a request that finds a bucket empty takes nothing.
_TAKE_TOKENS = text(
    """
    INSERT INTO rate_limits AS b (key, tokens, rate, burst, refused, updated_at)
    SELECT key, burst - 1, rate, burst, false, now()
    FROM unnest(CAST(:keys AS text[]), CAST(:rates AS float8[]), CAST(:bursts AS float8[]))
         AS x(key, rate, burst)
    ON CONFLICT (key) DO UPDATE SET
        tokens = CASE WHEN REFILLED >= 1 THEN REFILLED - 1 ELSE REFILLED END,
        refused = REFILLED < 1,
        rate = EXCLUDED.rate,
        burst = EXCLUDED.burst,
        updated_at = now()
    RETURNING refused, (1 - tokens) / rate AS wait, xmax = 0 AS created
    """.replace("REFILLED", _REFILLED)
)
_FORGET_FULL_BUCKETS = text(
    "DELETE FROM rate_limits WHERE updated_at < now() - make_interval(secs => :idle)"
)


async def take_tokens(db: Database, buckets: list[Bucket], forget_after: float) -> float | None:
    """Count one request against every bucket; the seconds to wait if any of them is empty.

    One statement and one commit, whatever the number of buckets, on a connection of
    its own: a refused request is counted even when the work it asked for never runs.
    ``forget_after``: seconds after which any idle bucket is full again (the longest refill).
    """
    if not buckets:
        return None
    params = {"keys": [b.key for b in buckets], "rates": [float(b.rate) for b in buckets],
              "bursts": [float(b.burst) for b in buckets]}
    async with db.engine.begin() as conn:
        rows = (await conn.execute(_TAKE_TOKENS, params)).all()
        if any(row.created for row in rows):
            # A new bucket: a good moment to drop those idle long enough to be full again
            # (a full bucket and no row mean the same).
            await conn.execute(_FORGET_FULL_BUCKETS, {"idle": float(forget_after)})
    waits = [float(row.wait) for row in rows if row.refused]
    return max(max(waits), 1.0) if waits else None


async def user_exists(session: AsyncSession, user_id: int) -> bool:
    return bool(await session.scalar(select(exists().where(User.id == user_id))))


async def create_assistant(
    session: AsyncSession, user_id: int, name: str, domains: list[str]
) -> NewAssistant:
    site_token = security.new_site_token()
    assistant = Assistant(
        user_id=user_id,
        name=name,
        domains=domains,
        site_token_hash=security.token_hash(site_token),
    )
    session.add(assistant)
    await session.commit()
    return NewAssistant(assistant.id, site_token, domains)


async def assistant_by_id(session: AsyncSession, assistant_id: int) -> Assistant | None:
    return await session.get(Assistant, assistant_id)


async def assistant_by_site_token(session: AsyncSession, site_token: str) -> Assistant | None:
    return await session.scalar(
        select(Assistant).where(Assistant.site_token_hash == security.token_hash(site_token))
    )


async def operator_dialog(session: AsyncSession, user_id: int, dialog_id: int) -> Dialog | None:
    """The dialog when the user is an operator of its assistant, else ``None``."""
    return await session.scalar(
        select(Dialog)
        .join(AssistantOperator, AssistantOperator.assistant_id == Dialog.assistant_id)
        .where(Dialog.id == dialog_id, AssistantOperator.user_id == user_id)
    )


async def create_dialog(session: AsyncSession, assistant_id: int, channel: str) -> NewDialog:
    guest_token = security.new_guest_token() if channel == "widget" else None
    dialog = Dialog(
        assistant_id=assistant_id,
        channel=channel,
        guest_token_hash=security.token_hash(guest_token) if guest_token else None,
    )
    session.add(dialog)
    await session.commit()
    return NewDialog(dialog.id, guest_token)


@dataclass(frozen=True)
class Principal:
    """Who writes to a dialog, in a form the database checks in the writing statement.

    ``operator``: a user id from a verified JWT; ``site`` and ``guest``: the SHA-256
    of a site or guest token (the only form the database keeps).
    """

    kind: Literal["operator", "site", "guest"]
    value: int | str
    #: guests only: the page origin the widget rule checks (``None``: the caller sent no
    #: ``Origin``, so it is no browser, and a client that is not could write any).
    origin: str | None = None

    @classmethod
    def operator(cls, user_id: int) -> Principal:
        return cls("operator", user_id)

    @classmethod
    def site(cls, site_token: str) -> Principal:
        return cls("site", security.token_hash(site_token))

    @classmethod
    def guest(cls, guest_token: str, origin: str | None = None) -> Principal:
        return cls("guest", security.token_hash(guest_token), origin)

    def params(self, dialog_id: int) -> dict[str, object]:
        """The bind parameters of :data:`THEIR_DIALOG` for this principal."""
        values: dict[str, object] = {"dialog_id": dialog_id, "principal": self.value}
        if self.kind == "guest":
            values["origin"] = self.origin
        return values


# "Dialog :dialog_id, if it is the principal's", for each kind of principal. Authorising
# inside the INSERT makes a message one statement and one commit, not three round trips.
THEIR_DIALOG = {
    "operator": "FROM dialogs d JOIN assistant_operators o ON o.assistant_id = d.assistant_id"
                " WHERE d.id = :dialog_id AND o.user_id = :principal",
    "site": "FROM dialogs d JOIN assistants a ON a.id = d.assistant_id"
            " WHERE d.id = :dialog_id AND a.site_token_hash = :principal",
    # The widget's origin rule too: the page must be on one of the assistant's domains.
    "guest": "FROM dialogs d JOIN assistants a ON a.id = d.assistant_id"
             " WHERE d.id = :dialog_id AND d.guest_token_hash = :principal"
             " AND (CAST(:origin AS text) IS NULL OR a.domains @> ARRAY[CAST(:origin AS text)])",
}
# The hot writes run on psycopg directly (Database.write): psycopg's parameter style.
_POST_MESSAGE = {
    kind: driver_sql(
        "INSERT INTO messages (dialog_id, sender, text)"
        f" SELECT d.id, :sender, :text {source} RETURNING replyx_message_json(messages)"
    )
    for kind, source in THEIR_DIALOG.items()
}
_SEND_TYPING = {
    kind: driver_sql(
        f"SELECT pg_notify('{NOTIFY_CHANNEL}', json_build_object("
        "'type', 'typing', 'dialog_id', d.id, 'sender', CAST(:sender AS text))::text)"
        f" {source}"
    )
    for kind, source in THEIR_DIALOG.items()
}
_PRINCIPAL_EXISTS = {
    "site": text("SELECT 1 FROM assistants WHERE site_token_hash = :principal"),
    "guest": text("SELECT 1 FROM dialogs WHERE guest_token_hash = :principal"),
}


async def post_message(
    db: Database, principal: Principal, dialog_id: int, sender: str, body: str
) -> str | None:
    """Insert and commit one message if the dialog is the principal's; return it rendered
    as its frame (a JSON text), or ``None`` when the dialog is not theirs (or not at all).

    The database assigns ``seq`` and sends the NOTIFY when this commits: one statement,
    alone or in a transaction shared with the worker's other writes of the moment
    (:mod:`backend.group_commit`).
    """
    row = await db.group.fetchone(
        _POST_MESSAGE[principal.kind],
        {**principal.params(dialog_id), "sender": sender, "text": body}, dialog_id)
    return None if row is None else str(row[0])


async def send_typing(db: Database, principal: Principal, dialog_id: int, sender: str) -> bool:
    """An ephemeral event: sent through NOTIFY on commit, never stored. False: not theirs."""
    row = await db.group.fetchone(
        _SEND_TYPING[principal.kind], {**principal.params(dialog_id), "sender": sender},
        dialog_id)
    return row is not None


async def principal_exists(db: Database, principal: Principal) -> bool:
    """Whether a site or guest token is known at all (operators are checked by their JWT)."""
    query = _PRINCIPAL_EXISTS.get(principal.kind)
    if query is None:
        return True
    async with db.engine.connect() as conn:
        return await conn.scalar(query, {"principal": principal.value}) is not None


async def guest_dialog_domains(
    db: Database, principal: Principal, dialog_id: int
) -> list[str] | None:
    """The domains of the guest's dialog's assistant; ``None`` when the dialog is not theirs."""
    async with db.engine.connect() as conn:
        domains: list[str] | None = await conn.scalar(
            text("SELECT a.domains FROM dialogs d JOIN assistants a ON a.id = d.assistant_id"
                 " WHERE d.id = :dialog_id AND d.guest_token_hash = :principal"),
            {"dialog_id": dialog_id, "principal": principal.value},
        )
    return domains


async def origin_registered(db: Database, origin: str) -> bool:
    """Whether ``origin`` is a domain of any assistant (a CORS preflight names no assistant)."""
    async with db.engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT EXISTS (SELECT 1 FROM assistants"
                 " WHERE domains @> ARRAY[CAST(:origin AS text)])"),
            {"origin": origin},
        )
    return bool(found)


async def messages_since(
    session: AsyncSession, dialog_id: int, since: int, limit: int
) -> list[str]:
    """Rendered messages with ``seq > since``, oldest first."""
    rows = await session.scalars(
        text(
            "SELECT replyx_message_json(m) FROM messages m"
            " WHERE m.dialog_id = :dialog_id AND m.seq > :since ORDER BY m.seq LIMIT :limit"
        ),
        {"dialog_id": dialog_id, "since": since, "limit": limit},
    )
    return list(rows)
