"""NOTIFY payloads in, parsed and validated events out.

A ``message`` payload is already the exact frame clients receive (the database
renders it with ``replyx_message_json``), so the gateway parses it only to read
the routing keys and forwards the original bytes. Invariant: an :class:`Event`
that leaves :func:`parse_event` has a valid dialog id (and, for a message, seq
and id) and a payload fit to send as it is; anything that does not look like
one of our events is rejected with :class:`BadPayloadError`, logged and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import orjson

from replyx.protocol import SENDERS, FrameType, positive_id

KINDS = frozenset({FrameType.MESSAGE, FrameType.MESSAGE_REF, FrameType.TYPING})


class BadPayloadError(ValueError):
    """A notification payload that is not one of our events."""


@dataclass(slots=True, frozen=True)
class Event:
    kind: str  # "message" | "message_ref" | "typing"
    dialog_id: int
    seq: int = 0
    message_id: int = 0
    payload: bytes = b""  # the frame's JSON text, for message and typing
    created_at: str | None = None


def _positive_id(value: object, name: str) -> int:
    # JSON numbers only: a string id is not what the trigger sends.
    number = positive_id(value) if not isinstance(value, str) else None
    if number is None:
        raise BadPayloadError(f"{name} must be a positive 64-bit integer")
    return number


def parse_event(payload: str | bytes) -> Event:
    """Validate one NOTIFY payload; raise :class:`BadPayloadError` for anything else."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadPayloadError("not JSON") from None
    if not isinstance(data, dict):
        raise BadPayloadError("not a JSON object")
    kind = data.get("type")
    if kind not in KINDS:
        raise BadPayloadError("unknown type")
    dialog_id = _positive_id(data.get("dialog_id"), "dialog_id")
    if kind == "typing":
        sender = data.get("sender")
        if sender not in SENDERS:
            raise BadPayloadError("unknown sender")
        # Re-encoded: only the three contract keys reach clients, whatever else was sent.
        frame = orjson.dumps({"type": "typing", "dialog_id": dialog_id, "sender": sender})
        return Event("typing", dialog_id, payload=frame)
    seq = _positive_id(data.get("seq"), "seq")
    message_id = _positive_id(data.get("id"), "id")
    if kind == "message_ref":
        return Event("message_ref", dialog_id, seq, message_id)
    if data.get("sender") not in SENDERS or not isinstance(data.get("text"), str):
        raise BadPayloadError("message without a valid sender and text")
    created_at = data.get("created_at")
    if not isinstance(created_at, str):
        raise BadPayloadError("message without created_at")
    return Event("message", dialog_id, seq, message_id, raw, created_at)


def age_seconds(created_at: str | None, now: float) -> float | None:
    """Seconds from a message's ``created_at`` to ``now`` (a Unix time), if parseable."""
    if not created_at:
        return None
    try:
        return now - datetime.fromisoformat(created_at).timestamp()
    except ValueError:
        return None
