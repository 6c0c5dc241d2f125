"""docs/asyncapi.yaml describes the socket protocol as built.

* its close codes are ``replyx.protocol.CloseCode``, number for number and name for name;
* its frame types are ``replyx.protocol.FrameType``'s socket frames;
* a real delivery (the in-process backend and gateway on the test database) on the
  three dialog endpoints, opened at the document's addresses: every frame received
  is valid against the JSON Schema of its message in the document, is one the
  channel's send operation lists, and the ``since`` rule holds as the document says.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from jsonschema.exceptions import ValidationError
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from replyx.protocol import CloseCode, FrameType
from tests.asyncapi import Frames, document
from tests.fix_apps import Api
from tests.fix_db import Tenant
from ws_gateway.app import Gateway


def test_close_codes_are_replyx_protocol_close_codes() -> None:
    codes = document()["components"]["schemas"]["CloseCode"]["oneOf"]
    assert {c["const"]: c["title"] for c in codes} == {c.value: c.name for c in CloseCode}
    assert all(c.get("description") for c in codes)


def test_frame_types_are_the_protocols_socket_frames() -> None:
    doc = document()
    names = {m["name"] for m in doc["components"]["messages"].values()}
    # message_ref and the team changes travel on NOTIFY only; health on /ws/health, the
    # check's probe.
    notify_only = {FrameType.MESSAGE_REF, FrameType.HEALTH, FrameType.OPERATOR_ADDED,
                   FrameType.OPERATOR_REMOVED}
    assert names == {t.value for t in FrameType} - notify_only
    dialog_frames = {"message", "typing", "ready", "read", "presence", "pong", "ping"}
    inbox_frames = {"snapshot", "dialog", "ready", "pong", "ping"}
    for name, channel in doc["channels"].items():
        expected = inbox_frames if name == "inbox" else dialog_frames
        assert set(channel["messages"]) == expected, name
        received = [op for op in doc["operations"].values()
                    if op["action"] == "receive" and op["channel"]["$ref"].endswith(name)]
        assert [m["$ref"].rsplit("/", 1)[1] for op in received for m in op["messages"]] == ["ping"]


def test_the_schemas_are_strict() -> None:
    frames = Frames(document(), "adminDialog")
    frames.check({"type": "typing", "dialog_id": 1, "sender": "operator"})
    for bad in ({"type": "typing", "dialog_id": 1, "sender": "nobody"},
                {"type": "ready", "dialog_id": 1, "last_seq": 0, "extra": True},
                {"type": "message", "dialog_id": 0, "seq": 1, "id": 1, "sender": "visitor",
                 "text": "x", "created_at": "2026-01-01T00:00:00.000000Z"}):
        with pytest.raises(ValidationError):
            frames.check(bad)


async def open_raw(url: str, origin: str | None = None) -> WebSocketClientConnection:
    headers = {"Origin": origin} if origin else {}
    return await websocket_connect(HTTPRequest(url, headers=headers), ping_interval=None)


async def read_until(conn: WebSocketClientConnection, done: Any, frames: Frames,
                     seen: list[dict[str, Any]]) -> None:
    while not done(seen):
        raw = await asyncio.wait_for(conn.read_message(), 10)
        assert raw is not None, f"closed: {conn.close_code} {conn.close_reason}"
        frame = orjson.loads(raw)
        frames.check(frame)
        seen.append(frame)


@pytest.mark.gen_test(timeout=60)
async def test_frames_of_a_real_delivery_match_the_document(
    api: Api, gateway: Gateway, tenant: Tenant
) -> None:
    doc = document()
    base = f"ws://127.0.0.1:{gateway.port}"
    dialog_id, guest = await api.widget_dialog(tenant)
    first = [await api.post_widget(dialog_id, guest, f"before {i}") for i in (1, 2)]
    since = first[0]["seq"]  # resume after the first: the replay is the second only

    def address(channel: str) -> str:
        return doc["channels"][channel]["address"].replace("{dialog_id}", str(dialog_id))

    urls = {
        "adminDialog": f"{address('adminDialog')}?token={quote(tenant.token)}",
        "widgetDialog": f"{address('widgetDialog')}?assistant_id={tenant.assistant_id}"
                        f"&guest_token={quote(guest)}",
        "siteDialog": f"{address('siteDialog')}?site_token={quote(tenant.site_token)}",
    }
    conns = {}
    seen: dict[str, list[dict[str, Any]]] = {}
    for channel, path in urls.items():
        origin = tenant.domains[0] if channel == "widgetDialog" else None
        conns[channel] = await open_raw(f"{base}{path}&since={since}", origin)
        seen[channel] = []
        await read_until(conns[channel], lambda s: any(f["type"] == "ready" for f in s),
                         Frames(doc, channel), seen[channel])
        # The since rule: every message with seq > since from the database, then ready.
        assert seen[channel] == [first[1], {"type": "ready", "dialog_id": dialog_id,
                                            "last_seq": first[1]["seq"]}]
        conns[channel].write_message(orjson.dumps({"type": "ping"}).decode())

    # Without since there is no replay: ready comes first.
    fresh = await open_raw(f"{base}{urls['adminDialog']}")
    fresh_frames: list[dict[str, Any]] = []
    await read_until(fresh, lambda s: bool(s), Frames(doc, "adminDialog"), fresh_frames)
    assert fresh_frames == [{"type": "ready", "dialog_id": dialog_id, "last_seq": first[1]["seq"]}]
    fresh.close()

    typing = await api.request("POST", f"/api/dialogs/{dialog_id}/typing", {},
                               token=tenant.token)
    assert typing.code == 204
    live = await api.post_operator(tenant, dialog_id, "live")
    for channel, conn in conns.items():
        await read_until(conn, lambda s: live in s, Frames(doc, channel), seen[channel])
        types = [f["type"] for f in seen[channel]]
        assert {"message", "ready", "pong", "typing"} <= set(types), types
        conn.close()

    # A since ahead of the dialog is refused with the document's 4400.
    conn = await open_raw(f"{base}{urls['siteDialog']}&since=999")
    assert await asyncio.wait_for(conn.read_message(), 10) is None
    bad_request = next(c for c in doc["components"]["schemas"]["CloseCode"]["oneOf"]
                       if c["title"] == "BAD_REQUEST")
    assert conn.close_code == bad_request["const"]
