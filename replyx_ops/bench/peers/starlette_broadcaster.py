"""The peer: what a Python team would otherwise build, Starlette + uvicorn + ``broadcaster``.

Run as ``uvicorn replyx_ops.bench.peers.starlette_broadcaster:app --workers 4`` with
``DATABASE_URL`` set. It does the product's job the way broadcaster's own chat
example does it, on the same database as ReplyX:

* ``POST /api/site/dialogs/{id}/messages?site_token=T`` checks the site token,
  INSERTs the message (the ``seq`` trigger numbers it) and publishes the
  rendered frame on the dialog's channel;
* ``/ws/dialogs/{id}?site_token=T`` subscribes to that channel and forwards
  every event to the socket, after a ``ready`` frame like ReplyX's.

Every worker holds sockets and LISTENs for its sockets' channels on its own
connection, which is how broadcaster lets four workers see each other's events.
The bench disables ReplyX's NOTIFY trigger while the peer runs, so Postgres does
no work here that the peer did not ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

import asyncpg
from broadcaster import Broadcast
from broadcaster._backends.postgres import PostgresBackend
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

DATABASE_URL = os.environ["DATABASE_URL"]

_OWNED = """
    SELECT d.id FROM dialogs d JOIN assistants a ON a.id = d.assistant_id
     WHERE d.id = $1 AND a.site_token_hash = $2
"""
_INSERT = """
    INSERT INTO messages (dialog_id, sender, text) VALUES ($1, 'visitor', $2)
    RETURNING replyx_message_json(messages)
"""


class LockedPostgresBackend(PostgresBackend):
    """broadcaster's Postgres backend with one lock around its single connection.

    Publishing, LISTEN and UNLISTEN share one asyncpg connection, so two requests
    at once fail with "another operation is in progress" (encode/broadcaster
    issue #22, still open in 0.3.1); serialising them is the known workaround.
    """

    async def connect(self) -> None:
        self._lock = asyncio.Lock()
        await super().connect()

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            await super().unsubscribe(channel)

    async def publish(self, channel: str, message: str) -> None:
        async with self._lock:
            await super().publish(channel, message)


broadcast = Broadcast(backend=LockedPostgresBackend(DATABASE_URL))
state: dict[str, asyncpg.Pool] = {}
# ``Broadcast.subscribe`` checks "first subscriber of this channel?", awaits the LISTEN,
# then *replaces* the channel's queue set: two sockets of one dialog subscribing at once
# leave one of them without events (seen as lost messages in this benchmark). One
# subscription at a time per worker avoids that; the LISTENs were serialised anyway.
subscribing = asyncio.Lock()


def channel(dialog_id: int) -> str:
    return f"dialog_{dialog_id}"


async def owned(dialog_id: int, site_token: str) -> bool:
    token_hash = hashlib.sha256(site_token.encode()).hexdigest()
    return await state["pool"].fetchval(_OWNED, dialog_id, token_hash) is not None


async def post_message(request: Request) -> Response:
    dialog_id = int(request.path_params["dialog_id"])
    if not await owned(dialog_id, request.query_params.get("site_token", "")):
        return JSONResponse({"error": "dialog not found"}, 404)
    body = await request.json()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text:
        return JSONResponse({"error": "text is required"}, 400)
    rendered = await state["pool"].fetchval(_INSERT, dialog_id, text)
    await broadcast.publish(channel(dialog_id), rendered)
    return Response(rendered, 201, media_type="application/json")


async def dialog_socket(websocket: WebSocket) -> None:
    dialog_id = int(websocket.path_params["dialog_id"])
    if not await owned(dialog_id, websocket.query_params.get("site_token", "")):
        await websocket.close(4004)
        return
    await websocket.accept()

    async def forward() -> None:
        async with contextlib.AsyncExitStack() as stack:
            async with subscribing:
                subscriber = await stack.enter_async_context(
                    broadcast.subscribe(channel(dialog_id))
                )
            last_seq = await state["pool"].fetchval(
                "SELECT last_seq FROM dialogs WHERE id = $1", dialog_id
            )
            await websocket.send_text(
                f'{{"type":"ready","dialog_id":{dialog_id},"last_seq":{last_seq}}}'
            )
            async for event in subscriber:  # type: ignore[union-attr]  # typed Optional by broadcaster, never None here
                if event is not None:
                    await websocket.send_text(event.message)

    sender = asyncio.create_task(forward())
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state["pool"] = await asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=10)
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()
        await state["pool"].close()


app = Starlette(
    routes=[
        Route("/api/site/dialogs/{dialog_id:int}/messages", post_message, methods=["POST"]),
        WebSocketRoute("/ws/dialogs/{dialog_id:int}", dialog_socket),
        Route("/health", lambda request: JSONResponse({"status": "ok"})),
    ],
    lifespan=lifespan,
)
