"""NOTIFY payloads in, parsed and validated events out.

A ``message`` payload is already the exact frame clients receive (the database
renders it with ``replyx_message_json``), so the gateway parses it only to read
the routing keys and forwards the original bytes. Invariant: an :class:`Event`
that leaves :func:`parse_event` has a valid dialog id (and, for a message, seq
and id) and a payload fit to send as it is; anything that does not look like
one of our events is rejected with :class:`BadPayloadError`, logged and dropped.

Besides messages and typing, the triggers of the workspace send ``read`` (a
side's read state, for dialog sockets), ``dialog`` (a dialog's new state, for
inbox sockets) and ``operator_added`` / ``operator_removed``; gateways send
``presence`` (new totals, see :mod:`ws_gateway.presence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import orjson

from replyx.protocol import MAX_ID, SENDERS, FrameType, ReadSide, non_negative_int, positive_id

KINDS = frozenset({
    FrameType.MESSAGE, FrameType.MESSAGE_REF, FrameType.TYPING, FrameType.READ,
    FrameType.DIALOG, FrameType.OPERATOR_ADDED, FrameType.OPERATOR_REMOVED, FrameType.PRESENCE,
})
#: The keys of a ``dialog`` entry the database renders (``replyx_dialog_json``); the
#: gateway adds ``visitor_online``.
DIALOG_KEYS = (
    "dialog_id", "assistant_id", "channel", "created_at", "last_seq", "last_message",
    "operator_read_seq", "visitor_read_seq", "unread", "activity",
)


#: How every ``dialog`` event the database renders begins (``json_build_object``'s
#: spacing). Only a fast path: when no inbox is open here, a payload that starts so is
#: not parsed at all (:meth:`ws_gateway.consumer.Consumer.put`); any other spelling is
#: parsed as usual.
DIALOG_PREFIX = '{"type" : "dialog", '


class BadPayloadError(ValueError):
    """A notification payload that is not one of our events."""


class Event(NamedTuple):
    """A message, message reference, typing or read event, for one dialog's sockets.

    A named tuple, immutable like the frozen dataclasses below, and built for every
    notification: a quarter of the cost of a frozen dataclass's ``__init__``.
    """

    kind: str  # "message" | "message_ref" | "typing" | "read"
    dialog_id: int
    seq: int = 0
    message_id: int = 0
    payload: bytes = b""  # the frame's JSON text, for message and typing
    created_at: str | None = None  # a message's, as the trigger sent it (see unix_time)


@dataclass(slots=True, frozen=True)
class DialogEvent:
    """A dialog's new state (created, a message, a read): what inbox sockets are sent."""

    dialog_id: int
    assistant_id: int
    fields: dict[str, object]  # DIALOG_KEYS, validated
    # (last_seq, operator_read_seq, visitor_read_seq): every change a commit makes to a
    # dialog moves one of them forward, and none ever moves back.
    version: tuple[int, int, int]

    kind = FrameType.DIALOG


@dataclass(slots=True, frozen=True)
class TeamEvent:
    """``operator_added`` / ``operator_removed``: who works on an assistant changed."""

    kind: FrameType
    assistant_id: int
    user_id: int


@dataclass(slots=True, frozen=True)
class PresenceEvent:
    """New presence totals published by a gateway (see ws_gateway/presence.py)."""

    version: int
    operators: list[tuple[int, int]]  # (assistant id, operators online)
    visitors: list[tuple[int, bool]]  # (dialog id, a visitor is on the page)

    kind = FrameType.PRESENCE


def _pairs(value: object, name: str) -> list[tuple[int, object]]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 for p in value
    ):
        raise BadPayloadError(f"{name} must be a list of pairs")
    return [(_positive_id(key, name), other) for key, other in value]


def parse_presence(data: dict[str, object]) -> PresenceEvent:
    version = _positive_id(data.get("version"), "version")
    operators = []
    for assistant_id, count in _pairs(data.get("operators", []), "operators"):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise BadPayloadError("operators counts must be non-negative integers")
        operators.append((assistant_id, count))
    visitors = []
    for dialog_id, online in _pairs(data.get("visitors", []), "visitors"):
        if not isinstance(online, bool):
            raise BadPayloadError("visitors must say true or false")
        visitors.append((dialog_id, online))
    return PresenceEvent(version, operators, visitors)


def parse_dialog(data: dict[str, object]) -> DialogEvent:
    """Validate a rendered dialog entry (from NOTIFY or from a snapshot query)."""
    dialog_id = _positive_id(data.get("dialog_id"), "dialog_id")
    assistant_id = _positive_id(data.get("assistant_id"), "assistant_id")
    numbers = {}
    for key in ("last_seq", "operator_read_seq", "visitor_read_seq", "unread", "activity"):
        value = data.get(key)
        number = None if isinstance(value, str) else non_negative_int(value)
        if number is None:
            raise BadPayloadError(f"{key} must be a non-negative integer")
        numbers[key] = number
    last = data.get("last_message")
    if last is not None and not isinstance(last, dict):
        raise BadPayloadError("last_message must be an object or null")
    version = (numbers["last_seq"], numbers["operator_read_seq"], numbers["visitor_read_seq"])
    return DialogEvent(dialog_id, assistant_id, {key: data.get(key) for key in DIALOG_KEYS},
                       version)


def _workspace_event(
    kind: str, data: dict[str, object]
) -> DialogEvent | TeamEvent | PresenceEvent | Event:
    if kind == FrameType.DIALOG:
        return parse_dialog(data)
    if kind == FrameType.PRESENCE:
        return parse_presence(data)
    if kind == FrameType.READ:
        dialog_id = _positive_id(data.get("dialog_id"), "dialog_id")
        side = data.get("side")
        seq = _positive_id(data.get("seq"), "seq")
        if side not in (ReadSide.OPERATOR, ReadSide.VISITOR):
            raise BadPayloadError("unknown side")
        frame = orjson.dumps({"type": "read", "dialog_id": dialog_id, "side": side, "seq": seq})
        return Event(FrameType.READ, dialog_id, payload=frame)
    return TeamEvent(FrameType(kind), _positive_id(data.get("assistant_id"), "assistant_id"),
                     _positive_id(data.get("user_id"), "user_id"))


def _positive_id(value: object, name: str) -> int:
    # What the trigger sends, three times per message: positive_id's int case, inlined (the
    # two calls it saves are ~0.4 us of a message's ~2.4 us of parsing; measured with timeit).
    if type(value) is int and 0 < value <= MAX_ID:
        return value
    # JSON numbers only: a string id is not what the trigger sends.
    number = positive_id(value) if not isinstance(value, str) else None
    if number is None:
        raise BadPayloadError(f"{name} must be a positive 64-bit integer")
    return number


def parse_event(payload: str | bytes) -> Event | DialogEvent | TeamEvent | PresenceEvent:
    """Validate one NOTIFY payload; raise :class:`BadPayloadError` for anything else."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadPayloadError("not JSON") from None
    if not isinstance(data, dict):
        raise BadPayloadError("not a JSON object")
    kind = data.get("type")
    # Names are checked as strings first: a JSON array or object is unhashable, and ``in`` a
    # set would raise TypeError instead of BadPayloadError.
    if not isinstance(kind, str) or kind not in KINDS:
        raise BadPayloadError("unknown type")
    if kind not in (FrameType.MESSAGE, FrameType.MESSAGE_REF, FrameType.TYPING):
        return _workspace_event(kind, data)
    dialog_id = _positive_id(data.get("dialog_id"), "dialog_id")
    if kind == "typing":
        sender = data.get("sender")
        if not isinstance(sender, str) or sender not in SENDERS:
            raise BadPayloadError("unknown sender")
        # Re-encoded: only the three contract keys reach clients, whatever else was sent.
        frame = orjson.dumps({"type": "typing", "dialog_id": dialog_id, "sender": sender})
        return Event("typing", dialog_id, payload=frame)
    seq = _positive_id(data.get("seq"), "seq")
    message_id = _positive_id(data.get("id"), "id")
    if kind == "message_ref":
        return Event("message_ref", dialog_id, seq, message_id)
    sender = data.get("sender")
    text = data.get("text")
    if not isinstance(sender, str) or sender not in SENDERS or not isinstance(text, str):
        raise BadPayloadError("message without a valid sender and text")
    created_at = data.get("created_at")
    if not isinstance(created_at, str):
        raise BadPayloadError("message without created_at")
    return Event("message", dialog_id, seq, message_id, raw, created_at)


def unix_time(created_at: str | None) -> float | None:
    """A message's ``created_at`` as a Unix time, read only for the messages the consumer
    times; ``None`` when absent or unparseable: the message is still routed, only not timed."""
    if created_at is None:
        return None
    try:
        return datetime.fromisoformat(created_at).timestamp()
    except ValueError:
        return None

