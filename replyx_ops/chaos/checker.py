"""The checker: every subscriber against the database, never against the gateway's bookkeeping.

The truth is the ``messages`` table, read on a connection of our own. For each
subscriber, the message frames it received across all its sessions must be the
dialog's rows from its starting point on, in ``seq`` order, each exactly once,
with the row's id and text. At a checkpoint a subscriber may lag (what it has
must be a clean prefix); at the end every subscriber still running must have
everything the database has. Counted: ``lost`` (a row in its range it never got),
``duplicated`` (a seq twice), ``reordered`` (a seq after a higher one), ``mismatch``
(a frame whose id or text is not the row's), ``foreign`` (another dialog's frame),
``phantom`` (a frame or row with a rolled-back text, or a frame no row backs).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from replyx_ops.chaos.clients import Received, Subscriber
from replyx_ops.chaos.writers import WriteLog

COUNTS = ("lost", "duplicated", "reordered", "mismatch", "foreign", "phantom")


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class Row:
    id: int
    sender: str
    digest: str
    head: str  # the text's first characters, for a readable divergence


@dataclass
class Truth:
    """The rows of the soak's dialogs, as one read saw them."""

    rows: dict[int, dict[int, Row]]
    last_seq: dict[int, int]
    read_at: float

    @classmethod
    async def read(cls, dsn: str, dialog_ids: list[int]) -> Truth:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=5, application_name="replyx-chaos-checker"
        ) as conn:
            read_at = time.time()
            cur = await conn.execute(
                "SELECT dialog_id, seq, id, sender, text FROM messages"
                " WHERE dialog_id = ANY(%s) ORDER BY dialog_id, seq", (dialog_ids,))
            rows: dict[int, dict[int, Row]] = {d: {} for d in dialog_ids}
            for dialog_id, seq, row_id, sender, text in await cur.fetchall():
                rows[dialog_id][seq] = Row(row_id, sender, digest(text), text[:48])
            cur = await conn.execute("SELECT id, last_seq FROM dialogs WHERE id = ANY(%s)",
                                     (dialog_ids,))
            last = {int(d): int(s) for d, s in await cur.fetchall()}
        return cls(rows, last, read_at)

    def total(self) -> int:
        return sum(len(r) for r in self.rows.values())


@dataclass
class Divergence:
    kind: str
    at: float  # time.time() of the frame (or of the check, for what never came)
    client: str
    socket_kind: str
    dialog_id: int
    session: int | None
    expected: Any
    got: Any
    context: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, t0: float) -> dict[str, Any]:
        return {
            "kind": self.kind, "t": round(self.at - t0, 3), "client": self.client,
            "socket_kind": self.socket_kind, "dialog_id": self.dialog_id,
            "session": self.session, "expected": self.expected, "got": self.got,
            **self.context,
        }


@dataclass
class Verdict:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    divergences: list[Divergence] = field(default_factory=list)
    messages_checked: int = 0
    #: Frames checked by socket kind and transport (``admin``, ``widget/sse``…).
    by_kind: dict[str, int] = field(default_factory=dict)
    subscribers_checked: int = 0
    not_caught_up: list[str] = field(default_factory=list)
    gave_up: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.counts.values()) and not self.not_caught_up and not self.gave_up

    def add(self, div: Divergence, count: int = 1) -> None:
        self.counts[div.kind] += count
        self.divergences.append(div)

    def first(self) -> Divergence | None:
        return min(self.divergences, key=lambda d: d.at) if self.divergences else None


def _frame(data: dict[str, Any]) -> dict[str, Any]:
    text = data.get("text")
    return {"seq": data.get("seq"), "id": data.get("id"), "sender": data.get("sender"),
            "text": text[:48] if isinstance(text, str) else text}


def _row(seq: int, row: Row | None) -> dict[str, Any]:
    if row is None:
        return {"seq": seq, "row": None}
    return {"seq": seq, "id": row.id, "sender": row.sender, "text": row.head}


def check_subscriber(sub: Subscriber, received: list[Received], truth: Truth, verdict: Verdict,
                     *, final: bool, rolled_back: set[str]) -> None:
    """Compare one subscriber's frames with the rows; add what differs to ``verdict``."""
    start = sub.start_seq
    if start is None:
        return  # never got as far as ready: nothing received, nothing owed
    verdict.subscribers_checked += 1
    rows = truth.rows.get(sub.dialog_id, {})
    seen: set[int] = set()
    top = start

    def diverge(kind: str, r: Received | None, expected: Any, got: Any, **ctx: Any) -> None:
        verdict.add(Divergence(
            kind, r.at if r is not None else time.time(), sub.name, sub.label,
            sub.dialog_id, r.session if r is not None else None, expected, got,
            {"since": sub.since, "start_seq": start, **ctx},
        ))

    for index, r in enumerate(received):
        data = r.data
        verdict.messages_checked += 1
        verdict.by_kind[sub.label] = verdict.by_kind.get(sub.label, 0) + 1
        seq = data.get("seq")
        recent = [x.data.get("seq") for x in received[max(0, index - 4):index]]
        if data.get("dialog_id") != sub.dialog_id:
            diverge("foreign", r, {"dialog_id": sub.dialog_id}, data.get("dialog_id"),
                    previous_seqs=recent)
            continue
        if not isinstance(seq, int):
            diverge("mismatch", r, "an integer seq", _frame(data), previous_seqs=recent)
            continue
        text = data.get("text")
        if isinstance(text, str) and text in rolled_back:
            diverge("phantom", r, "no frame (rolled back)", _frame(data), previous_seqs=recent)
        if seq in seen or seq <= start:
            diverge("duplicated", r, _row(top + 1, rows.get(top + 1)), _frame(data),
                    previous_seqs=recent)
            continue
        if seq < top:
            diverge("reordered", r, _row(top + 1, rows.get(top + 1)), _frame(data),
                    previous_seqs=recent)
        row = rows.get(seq)
        if row is None:
            diverge("phantom", r, _row(seq, None), _frame(data), previous_seqs=recent,
                    note="no row backs this frame")
        elif row.id != data.get("id") or not isinstance(text, str) or digest(text) != row.digest:
            diverge("mismatch", r, _row(seq, row), _frame(data), previous_seqs=recent)
        seen.add(seq)
        top = max(top, seq)

    alive = sub.lifetime is None and sub.gave_up is None
    end = truth.last_seq.get(sub.dialog_id, 0) if final and alive else top
    missing = [s for s in range(start + 1, end + 1) if s not in seen]
    if missing:
        first = missing[0]
        if final and alive and all(s > top for s in missing):
            verdict.not_caught_up.append(sub.name)
        # When the frame after the hole arrived: that is when the loss became visible.
        after = next((r for r in received if isinstance(r.data.get("seq"), int)
                      and r.data["seq"] > first), None)
        diverge("lost", after, _row(first, rows.get(first)),
                _frame(after.data) if after is not None else None,
                missing_seqs=missing[:20], missing_total=len(missing),
                close_codes=sub.close_codes()[-10:])
        verdict.counts["lost"] += len(missing) - 1
    if final and sub.gave_up is not None and sub.lifetime is None:
        verdict.gave_up[sub.name] = {"code": sub.gave_up[0], "reason": sub.gave_up[1]}


def check(subscribers: Iterable[Subscriber], snapshots: dict[str, list[Received]], truth: Truth,
          writes: WriteLog, *, final: bool) -> Verdict:
    """Check every subscriber from a snapshot of its frames taken *before* ``truth`` was read
    (so every frame it holds was committed by then)."""
    verdict = Verdict()
    for sub in subscribers:
        check_subscriber(sub, snapshots.get(sub.name, []), truth, verdict, final=final,
                         rolled_back=writes.rolled_back)
        if final:
            check_other_frames(sub, verdict)
    return verdict


def check_other_frames(sub: Subscriber, verdict: Verdict) -> None:
    """Typing and ready frames: only the subscriber's dialog, and typing carries no seq."""
    for r in sub.other_frames():
        data = r.data
        dialog_id = data.get("dialog_id")
        if dialog_id is not None and dialog_id != sub.dialog_id:
            verdict.add(Divergence("foreign", r.at, sub.name, sub.label, sub.dialog_id,
                                   r.session, {"dialog_id": sub.dialog_id}, data))
        elif data.get("type") == "typing" and "seq" in data:
            verdict.add(Divergence("mismatch", r.at, sub.name, sub.label, sub.dialog_id,
                                   r.session, "a typing frame without seq", data))


async def check_writes(dsn: str, writes: WriteLog) -> dict[str, Any]:
    """Acknowledged texts must be rows; rolled-back texts must not be."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     connect_timeout=5) as conn:
        cur = await conn.execute("SELECT text FROM messages WHERE text = ANY(%s)",
                                 (list(writes.acked | writes.rolled_back),))
        present = {text for (text,) in await cur.fetchall()}
        cur = await conn.execute("SELECT text FROM messages WHERE text = ANY(%s)",
                                 (list(writes.unknown),))
        unknown_committed = len(await cur.fetchall())
    missing = sorted(writes.acked - present)
    phantom = sorted(writes.rolled_back & present)
    return {
        "acked_missing": len(missing), "acked_missing_sample": [t[:48] for t in missing[:5]],
        "rolled_back_committed": len(phantom),
        "rolled_back_committed_sample": [t[:48] for t in phantom[:5]],
        "unknown_committed": unknown_committed, "unknown_total": len(writes.unknown),
    }
