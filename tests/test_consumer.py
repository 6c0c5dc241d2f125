"""The consumer's intake (ws_gateway/consumer.py), as a pure unit below the real tests.

Every message commit also sends its dialog's new state for inboxes; a gateway with
no inbox open must not pay for parsing those (``replyx bench``'s many-dialogs
fan-out), yet must route them again the moment an inbox starts joining.
"""

from __future__ import annotations

from typing import Any, cast

from ws_gateway.consumer import Consumer, WriteBatch
from ws_gateway.metrics import Stats

# What the database's replyx_dialog_json renders (json_build_object's spacing).
DIALOG = ('{"type" : "dialog", "dialog_id" : 5, "assistant_id" : 2, "channel" : "site",'
          ' "created_at" : "2026-11-27T10:00:00.000000Z", "last_seq" : 1, "last_message" : null,'
          ' "operator_read_seq" : 0, "visitor_read_seq" : 0, "unread" : 1, "activity" : 9}')
MESSAGE = ('{"type":"message","dialog_id":5,"seq":1,"id":11,"sender":"visitor","text":"hi",'
           '"created_at":"2026-11-27T10:00:00.000000Z"}')


class Workspace:
    def __init__(self) -> None:
        self.inbox_joining = False

    def wants_dialogs(self) -> bool:
        return self.inbox_joining


def queued(consumer: Consumer) -> list[str]:
    return [payload for payload, _ in consumer.queue._queue]  # type: ignore[attr-defined]


def test_dialog_events_are_counted_but_not_queued_while_no_inbox_is_open() -> None:
    workspace, stats = Workspace(), Stats()
    consumer = Consumer(cast(Any, None), cast(Any, workspace), cast(Any, None), stats,
                        WriteBatch())
    consumer.put(DIALOG)
    consumer.put(MESSAGE)
    assert queued(consumer) == [MESSAGE]
    assert stats.notifications == 1  # the dialog event; the message is counted when routed

    workspace.inbox_joining = True  # an inbox is taking its snapshot: it needs every event
    consumer.put(DIALOG)
    assert queued(consumer) == [MESSAGE, DIALOG]
    # A dialog event spelled otherwise (hand-made, from psql) is always parsed and judged.
    workspace.inbox_joining = False
    other = DIALOG.replace('"type" : "dialog"', '"type":"dialog"')
    consumer.put(other)
    assert queued(consumer) == [MESSAGE, DIALOG, other]
