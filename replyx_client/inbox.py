"""An operator's inbox (``/ws/inbox``), as a panel keeps it: a snapshot, then live updates.

``dialogs`` maps each dialog id to its newest ``dialog`` entry. Every snapshot
(the first, and one after each reconnect or resync) replaces the view; each
live ``dialog`` frame replaces one entry. The socket reconnects with backoff
like :class:`~replyx_client.dialog.DialogClient`; there is no ``since``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import HTTPRequest

from replyx_client.dialog import DialogClient


@dataclass
class InboxClient(DialogClient):
    """:param url: ``ws://…/ws/inbox?token=JWT`` (with ``transport="sse"``: ``/sse/inbox``)."""

    resumes_with_seq = False

    dialogs: dict[int, dict[str, Any]] = field(default_factory=dict)
    total: int = 0
    snapshots: int = 0
    updates: int = 0
    # Live entries no newer than what the view already had (a repeat or an older state).
    stale: int = 0

    def _request(self) -> HTTPRequest:
        return HTTPRequest(self.url, connect_timeout=5, request_timeout=10)

    def _apply(self, data: dict[str, Any]) -> bool:
        kind = data.get("type")
        if kind == "snapshot":
            self.snapshots += 1
            self.total = data["total"]
            self.dialogs = {entry["dialog_id"]: entry for entry in data["dialogs"]}
        elif kind == "dialog":
            self.updates += 1
            known = self.dialogs.get(data["dialog_id"])
            if known is None:
                self.total += 1 if data["last_seq"] == 0 else 0
            elif all(a <= b for a, b in zip(_version(data), _version(known), strict=True)) and (
                data.get("visitor_online") == known.get("visitor_online")
            ):
                self.stale += 1
            self.dialogs[data["dialog_id"]] = data
        return kind == "ready"

    def view(self) -> dict[int, tuple[int, int, int, int]]:
        """``dialog id → (last_seq, operator_read_seq, visitor_read_seq, unread)``."""
        return {
            dialog_id: (d["last_seq"], d["operator_read_seq"], d["visitor_read_seq"], d["unread"])
            for dialog_id, d in self.dialogs.items()
        }


def _version(entry: dict[str, Any]) -> tuple[int, int, int]:
    # Each commit that changes a dialog moves one of these forward; none moves back.
    return entry["last_seq"], entry["operator_read_seq"], entry["visitor_read_seq"]
