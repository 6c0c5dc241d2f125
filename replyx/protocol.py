"""The protocol's vocabulary: every name and number that clients, servers and psql share.

One place for each fact of the contract (``../shared/SPEC.md``): close codes,
frame types, socket kinds, senders, the NOTIFY channel, the application names
the gateway's connections carry in ``pg_stat_activity``, and the one rule for
reading an id. Dependency-free on purpose: the servers, the clients, the
operator tools and the tests all import it, and it imports nothing of theirs.

Three words that look alike mean different things, and keep them apart:

* **socket kind** (``admin``, ``widget``, ``site``): which endpoint a socket
  came through, and so who is on it: the operator panel (operator JWT), a
  visitor's widget (guest token), a site integration (site token);
* **sender** (``visitor``, ``operator``, ``assistant``, ``system``): who wrote a message;
* **dialog channel** (``widget``, ``site``): where a dialog was started (the
  ``dialogs.channel`` column). The NOTIFY *channel* is Postgres' word for the
  event stream, :data:`NOTIFY_CHANNEL`.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

#: Ids are Postgres ``bigint``: positive and at most this.
MAX_ID = 2**63 - 1

#: The NOTIFY channel every event travels on; operators ``LISTEN replyx_events;`` in psql.
NOTIFY_CHANNEL = "replyx_events"
#: The triggers on ``messages`` that send on it: each message (per row), then the state of
#: each dialog the statement wrote to (per statement, for inboxes).
NOTIFY_TRIGGERS = ("messages_notify", "messages_notify_dialogs")

#: ``application_name`` of the gateway's LISTEN connection, of its query pool and of the
#: backend's pool (``pg_stat_activity`` tells them apart; ``replyx check`` looks for the first).
LISTENER_APPLICATION = "replyx-gateway-listener"
GATEWAY_APPLICATION = "replyx-gateway"
BACKEND_APPLICATION = "replyx-backend"


class CloseCode(IntEnum):
    """Close codes a socket can end with, and what the client should do about each."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    ABNORMAL = 1006  # never sent: what a client sees when the connection just drops
    INVALID_DATA = 1007  # invalid UTF-8 in a text frame
    POLICY = 1008  # rate limit, too many sockets
    TOO_BIG = 1009  # an inbound frame over the limit
    INTERNAL_ERROR = 1011
    RESTARTING = 1012  # the gateway is restarting: resume with since
    TRY_AGAIN = 1013  # the database did not answer in time
    UNAUTHORIZED = 4001  # missing, bad or expired credential
    FORBIDDEN_ORIGIN = 4003  # the page origin is not one of the assistant's domains
    NOT_FOUND = 4004  # dialog not found, or not yours (the two look the same)
    TOO_SLOW = 4008  # the client's buffer overflowed: resume with since
    BAD_REQUEST = 4400  # since malformed, or ahead of the dialog


#: Closes after which reconnecting cannot help: the credential, origin or dialog is wrong,
#: or the client misbehaves. Every other close means "reconnect with since".
FATAL_CLOSE_CODES = frozenset({
    CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN_ORIGIN, CloseCode.NOT_FOUND,
    CloseCode.BAD_REQUEST, CloseCode.POLICY, CloseCode.TOO_BIG,
})

#: Codes a handshake can be refused with (metrics export each from 0).
REFUSAL_CODES = (
    CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN_ORIGIN, CloseCode.NOT_FOUND,
    CloseCode.BAD_REQUEST, CloseCode.POLICY, CloseCode.TRY_AGAIN,
)


class SocketKind(StrEnum):
    """Which endpoint a socket came through; log tags ``[Admin]``, ``[Widget]``, ``[Site]``."""

    ADMIN = "admin"  # /ws/dialogs/{id}: the operator panel, operator JWT
    WIDGET = "widget"  # /ws/widget/dialogs/{id}: a visitor, guest token + page origin
    SITE = "site"  # /ws/site/dialogs/{id}: a site integration, site token
    INBOX = "inbox"  # /ws/inbox: an operator's workspace, operator JWT

    @property
    def tag(self) -> str:
        return f"[{self.value.capitalize()}]"


#: The kinds of socket that follow one dialog (the inbox follows many).
DIALOG_SOCKET_KINDS = (SocketKind.ADMIN, SocketKind.WIDGET, SocketKind.SITE)


class Sender(StrEnum):
    """Who wrote a message (the ``messages.sender`` column)."""

    VISITOR = "visitor"
    OPERATOR = "operator"
    ASSISTANT = "assistant"
    SYSTEM = "system"


SENDERS = frozenset(s.value for s in Sender)


class DialogChannel(StrEnum):
    """Where a dialog was started (the ``dialogs.channel`` column)."""

    WIDGET = "widget"
    SITE = "site"


class FrameType(StrEnum):
    """The ``type`` of a JSON frame or NOTIFY payload."""

    MESSAGE = "message"
    MESSAGE_REF = "message_ref"  # NOTIFY only: a message too big for a payload, by reference
    TYPING = "typing"
    READY = "ready"
    PING = "ping"
    PONG = "pong"
    HEALTH = "health"
    READ = "read"  # a side's read state moved: {"dialog_id","side","seq"}
    DIALOG = "dialog"  # the workspace: a dialog's state, for inbox sockets
    SNAPSHOT = "snapshot"  # the workspace: an inbox's first view
    PRESENCE = "presence"  # who is online; as NOTIFY, new totals between gateways
    OPERATOR_ADDED = "operator_added"  # NOTIFY only: team changes
    OPERATOR_REMOVED = "operator_removed"


class ReadSide(StrEnum):
    """Whose read state a ``read`` frame reports."""

    OPERATOR = "operator"
    VISITOR = "visitor"


def positive_id(value: object) -> int | None:
    """An id from a path segment, a query value or a JSON number; ``None`` if it is not one.

    Accepts a decimal string of ASCII digits or an ``int`` (never a ``bool``), in
    ``1..MAX_ID``. Callers turn ``None`` into their own refusal (404, 400, 4004…).
    """
    number = non_negative_int(value)
    return number if number is not None and number > 0 else None


def non_negative_int(value: object) -> int | None:
    """:func:`positive_id`, with 0 allowed (``since=0``)."""
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 19:
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        return None
    return value
