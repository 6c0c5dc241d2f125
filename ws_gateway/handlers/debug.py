"""``/api/debug/websocket/{status,sync}``: what a support engineer asks of the gateway.

Invariant: a caller sees only what it may (see :meth:`GatewayHandler.viewer`):
everything from a direct loopback peer, otherwise the dialogs of the operator
whose token it shows; a dialog that is not theirs is "not found".
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from replyx.gateways import gateway_name
from replyx.protocol import DIALOG_SOCKET_KINDS, SocketKind, positive_id
from replyx.web import ApiError
from ws_gateway.handlers.http import GatewayHandler
from ws_gateway.metrics import TRANSPORTS
from ws_gateway.parts import Parts

KINDS = DIALOG_SOCKET_KINDS
MAX_DIALOGS_LISTED = 1000


def listener_state(parts: Parts) -> dict[str, Any]:
    listener = parts.listener
    return {
        "state": listener.state,
        "backend_pid": listener.backend_pid,
        "reconnects": listener.reconnects,
        "down_for_s": (
            round(time.monotonic() - listener.down_since, 3)
            if listener.down_since is not None else None
        ),
        "last_error": listener.last_error if listener.state != "up" else None,
        "queue": parts.consumer.queue.qsize(),
        "resyncing_dialogs": parts.router.resyncing,
    }


class StatusHandler(GatewayHandler):
    async def get(self) -> None:
        user_id = self.viewer()
        router = self.parts.router
        dialog_ids = list(router.dialogs)
        if user_id is not None:
            allowed = await self.parts.store.operator_dialog_ids(user_id, dialog_ids)
            dialog_ids = [d for d in dialog_ids if d in allowed]
        workspace = self.parts.workspace
        # An operator sees their own inboxes only, as they see only their own dialogs.
        inbox_subs = [sub for uid, subs in workspace.inboxes_of.items()
                      if user_id is None or uid == user_id for sub in subs]
        inboxes = len(inbox_subs)
        totals: Counter[str] = Counter()
        transports: Counter[str] = Counter()
        dialogs: dict[int, dict[str, int]] = {}
        for dialog_id in dialog_ids:
            subs = router.sockets_of(dialog_id)
            kinds = Counter(sub.kind for sub in subs)
            transports.update(getattr(sub, "transport_name", "ws") for sub in subs)
            totals.update(kinds)
            if len(dialogs) < MAX_DIALOGS_LISTED:
                dialogs[dialog_id] = {kind: kinds.get(kind, 0) for kind in KINDS}
        self.write_json(
            {
                "gateway": gateway_name(self.parts.settings),
                "connections": {
                    "total": sum(totals.values()) + inboxes,
                    **{k: totals[k] for k in KINDS}, SocketKind.INBOX: inboxes,
                },
                # Dialog sessions and inboxes by transport: WebSocket or server-sent events.
                "transports": {
                    t: transports[t] + sum(
                        1 for s in inbox_subs if getattr(s, "transport_name", "ws") == t)
                    for t in TRANSPORTS
                },
                "dialogs": dialogs,
                "dialogs_total": len(dialog_ids),
                "listener": listener_state(self.parts),
                **({"presence": self.parts.presence.status()} if user_id is None else {}),
            }
        )


class SyncHandler(GatewayHandler):
    async def get(self) -> None:
        user_id = self.viewer()
        dialog_id = positive_id(self.get_query_argument("dialog_id", ""))
        if dialog_id is None:
            raise ApiError(400, "dialog_id must be a positive integer")
        store = self.parts.store
        if user_id is not None and not await store.operator_dialog_ids(user_id, [dialog_id]):
            raise ApiError(404, "dialog not found")
        db_last_seq = await store.existing_last_seq(dialog_id)
        if db_last_seq is None:
            raise ApiError(404, "dialog not found")
        subs = list(self.parts.router.sockets_of(dialog_id))
        kinds = Counter(sub.kind for sub in subs)
        delivered = [sub.sent_seq for sub in subs]
        catching_up = sum(1 for sub in subs if sub.buffer is not None)
        self.write_json(
            {
                "dialog_id": dialog_id,
                "sockets": {kind: kinds.get(kind, 0) for kind in KINDS},
                "db_last_seq": db_last_seq,
                "delivered_last_seq": min(delivered) if delivered else None,
                "delivered_max_seq": max(delivered) if delivered else None,
                "catching_up": catching_up,
                "in_sync": catching_up == 0 and all(seq == db_last_seq for seq in delivered),
                "listener": self.parts.listener.state,
            }
        )
