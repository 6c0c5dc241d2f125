"""The SSE transport (``/sse/…``): the sockets' guarantees, auth and limits over event streams.

Each delivery test compares every stream with the database (seq 1..N once, in
order; ``tests/checks.py``); each refusal is compared with the close code the
WebSocket twin of the same URL gets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop

from replyx_client import DialogClient, InboxClient
from replyx_client.sse import sse_connect
from tests.consistency import assert_match_database, site_poster
from tests.fix_apps import Api, Sockets, refusal
from tests.fix_db import Tenant, make_settings
from tests.net import eventually, get_json
from ws_gateway.app import Gateway
from ws_gateway.frames import text_frame
from ws_gateway.sse import SLICES, Streams, close_event, render, ws_payload

SSE: dict[str, Any] = {"transport": "sse"}
INSERT = "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, %s, %s)"


def sse_url(ws_url: str) -> str:
    return DialogClient(ws_url, transport="sse").stream_url


async def open_three_sse(
    sockets: Sockets, tenant: Tenant, dialog_id: int, guest: str, **kwargs: Any
) -> list[DialogClient]:
    return [
        await sockets.open(sockets.admin_url(tenant, dialog_id), **SSE, **kwargs),
        await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                           origin=tenant.domains[0], **SSE, **kwargs),
        await sockets.open(sockets.site_url(tenant, dialog_id), **SSE, **kwargs),
    ]


async def raw_stream(url: str, headers: dict[str, str] | None = None, *,
                     until: bytes = b"\0", timeout: float = 10.0) -> bytes:  # noqa: ASYNC109
    """Read a stream's body until ``until`` appears or (by default) the stream ends."""
    stream = await sse_connect(url, headers)
    body = b""
    try:
        async with asyncio.timeout(timeout):
            while until not in body:
                await stream._fill()
                body, stream._text = body + stream._text, b""
                if stream._eof:
                    break
    finally:
        stream.close()
    return body


# -- delivery ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_messages_reach_every_kind_of_stream_in_order_once(
    api: Api, sockets: Sockets, tenant: Tenant, database_url: str
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    clients = await open_three_sse(sockets, tenant, dialog_id, guest, since=0)
    for i in range(5):
        await api.post_widget(dialog_id, guest, f"visitor {i}")
        await api.post_operator(tenant, dialog_id, f"operator {i}")
        await api.post_site(tenant, dialog_id, f"site {i}")
    assert await assert_match_database(database_url, dialog_id, clients) == 15
    assert all(c.connects == 1 and c.close_codes == [] for c in clients)


@pytest.mark.gen_test(timeout=60)
async def test_event_format_ids_on_messages_and_ready_only(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    await api.post_widget(dialog_id, guest, "one\nline two")
    url = sse_url(sockets.admin_url(tenant, dialog_id)) + "&since=0"
    body = await raw_stream(url, until=b'"type":"ready"')
    assert body.startswith(b"retry: "), body
    events = [e for e in body.split(b"\n\n") if e and not e.startswith(b"retry:")]
    assert events[0].startswith(b"id: 1\ndata: {"), events
    assert b'"type":"message"' in events[0] and b"one\\nline two" in events[0]
    assert events[1].startswith(b"id: 1\ndata: {") and b'"type":"ready"' in events[1]

    client = await sockets.open(sockets.admin_url(tenant, dialog_id), **SSE)
    r = await api.request("POST", f"/api/widget/dialogs/{dialog_id}/typing", {}, token=guest)
    assert r.code in (200, 201, 202, 204), r.body
    typing = await client.wait_for_frame(lambda f: f.get("type") == "typing")
    assert typing == {"type": "typing", "dialog_id": dialog_id, "sender": "visitor"}
    conn = client._conn
    assert conn is not None and getattr(conn, "last_event_id", None) == "1"  # typing: no id


@pytest.mark.gen_test(timeout=60)
async def test_since_and_last_event_id_resume_without_gap_or_duplicate(
    api: Api, sockets: Sockets, tenant: Tenant, database_url: str
) -> None:
    dialog_id = await api.site_dialog(tenant)
    for i in range(6):
        await api.post_site(tenant, dialog_id, f"m{i}")
    by_since = await sockets.open(sockets.site_url(tenant, dialog_id), since=2, **SSE)
    # The browser's own reconnect: Last-Event-ID wins over the URL's original since.
    header = DialogClient(sockets.site_url(tenant, dialog_id), **SSE)
    header.url += "&since=1"
    header.last_seq = 4
    sockets.clients.append(await header.connect())
    for i in range(6, 9):
        await api.post_site(tenant, dialog_id, f"m{i}")
    await assert_match_database(database_url, dialog_id, [by_since],
                                first={id(by_since): 3})
    await header.wait_for_seq(9)
    assert header.seqs == [5, 6, 7, 8, 9] and header.duplicates == 0 and header.gaps == 0
    # A resume point ahead of the dialog is refused like since: 4400.
    body = await raw_stream(sse_url(sockets.site_url(tenant, dialog_id)),
                            {"Last-Event-ID": "99"}, until=b"\0")
    assert b'event: close\ndata: {"code":4400,' in body


# -- faults ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_gateway_restart_closes_with_1012_and_streams_resume(
    io_loop: IOLoop, api: Api, tenant: Tenant, database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "var")
    gateway = Gateway(settings, database_url)
    await gateway.start(port=0, host="127.0.0.1")
    port = gateway.port
    assert port is not None
    sockets = Sockets(f"ws://127.0.0.1:{port}")
    try:
        dialog_id, guest = await api.widget_dialog(tenant)
        clients = await open_three_sse(sockets, tenant, dialog_id, guest, since=0)
        poster = site_poster(api, tenant, dialog_id, rate=30).start()
        await poster.wait_created(20)
        await gateway.stop()
        await poster.wait_created(40)
        gateway = Gateway(settings, database_url)
        await gateway.start(port=port, host="127.0.0.1")
        await poster.wait_created(60)
        await poster.stop()
        await assert_match_database(database_url, dialog_id, clients)
        for client in clients:
            assert client.close_codes[0] == 1012, client.close_codes
            assert client.connects >= 2
    finally:
        await sockets.close_all()
        await gateway.stop()


@pytest.mark.gen_test(timeout=90)
async def test_listener_killed_streams_lose_nothing(
    api: Api, gateway: Gateway, sockets: Sockets, tenant: Tenant, database_url: str,
    sql: psycopg.Connection[Any],
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    clients = await open_three_sse(sockets, tenant, dialog_id, guest, since=0)
    poster = site_poster(api, tenant, dialog_id, rate=40).start()
    await poster.wait_created(30)
    # pg_terminate_backend of the replyx-gateway-listener session, as an operator would.
    killed = gateway.listener.backend_pid
    row = sql.execute("SELECT pid FROM pg_stat_activity WHERE application_name ="
                      " 'replyx-gateway-listener' AND pid = %s", (killed,)).fetchone()
    assert row is not None
    sql.execute("SELECT pg_terminate_backend(%s)", (killed,))
    deadline = time.monotonic() + 30
    while not (gateway.listener.is_up and gateway.listener.backend_pid != killed):
        assert time.monotonic() < deadline, "the listener did not come back"
        await asyncio.sleep(0.02)
    await poster.wait_created(70)
    await poster.stop()
    await assert_match_database(database_url, dialog_id, clients)
    assert all(c.connects == 1 and c.close_codes == [] for c in clients)


@pytest.mark.gen_test(timeout=60)
async def test_a_stream_that_is_not_read_is_cut_with_4008_after_its_data(
    io_loop: IOLoop, api: Api, tenant: Tenant, database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "var", REPLYX_SOCKET_BUFFER="16384")
    gateway = Gateway(settings, database_url)
    await gateway.start(port=0, host="127.0.0.1")
    try:
        dialog_id = await api.site_dialog(tenant)
        url = (f"/sse/site/dialogs/{dialog_id}?site_token={quote(tenant.site_token)}")
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + 10
        while not any(s.buffer is None for s in gateway.router.sockets_of(dialog_id)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        text = "x" * 4000
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            for b in range(100):
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(INSERT, [
                        (dialog_id, "assistant", f"{b}/{i} {text}") for i in range(50)])
                await asyncio.sleep(0.05)
                if gateway.stats.slow_consumers_dropped:
                    break
        assert gateway.stats.slow_consumers_dropped == 1
        # It reads again as soon as the gateway gave up on it, and so sees why.
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        body = b""
        async with asyncio.timeout(30):
            while chunk := await loop.sock_recv(sock, 1 << 20):
                body += chunk
        sock.close()
        # Whole events only, then the close event last.
        tail = body.rsplit(b"\n\n", 2)[-2]
        assert tail.startswith(b'event: close\ndata: {"code":4008,'), tail
        seqs = [int(line[4:]) for line in body.split(b"\n") if line.startswith(b"id: ")]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    finally:
        await gateway.stop()


# -- security -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_refusals_are_one_close_event_with_the_sockets_code(
    api: Api, sockets: Sockets, tenant: Tenant, make_tenant: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dialog_id, guest = await api.widget_dialog(tenant)
    other = make_tenant()
    other_dialog = await api.site_dialog(other)
    cases: list[tuple[str, str | None, int]] = [
        (sockets.base + f"/ws/dialogs/{dialog_id}?token=bad", None, 4001),
        (sockets.base + f"/ws/dialogs/{dialog_id}", None, 4001),
        (sockets.admin_url(tenant, other_dialog), None, 4004),
        (sockets.admin_url(tenant, "x"), None, 4004),
        (sockets.admin_url(tenant, dialog_id) + "&since=-1", None, 4400),
        (sockets.admin_url(tenant, dialog_id) + "&since=99", None, 4400),
        (sockets.site_url(other, dialog_id), None, 4004),
        (sockets.base + f"/ws/site/dialogs/{dialog_id}?site_token=nope", None, 4001),
        (sockets.widget_url(tenant, dialog_id, guest), "https://evil.example", 4003),
        (sockets.widget_url(tenant, dialog_id, guest), None, 4003),
        (sockets.widget_url(tenant, dialog_id, "not-a-guest-token"), tenant.domains[0], 4001),
        (sockets.widget_url(other, dialog_id, guest), other.domains[0], 4004),
        (sockets.base + "/ws/inbox?token=bad", None, 4001),
    ]
    for url, origin, code in cases:
        ws_code, ws_reason = await refusal(url, origin)
        assert ws_code == code, url
        headers = {"Origin": origin} if origin else None
        body = await raw_stream(sse_url(url), headers, until=b"\0")
        events = [e for e in body.split(b"\n\n") if e and not e.startswith(b"retry:")]
        # One event, and it is the socket's close: the same code and the same reason.
        assert events == [b"event: close\ndata: " + orjson.dumps(
            {"code": code, "reason": ws_reason})], (url, body)
    assert "transport=sse" in caplog.text and "WEBSOCKET_4003_ERROR" in caplog.text
    for secret in (tenant.token, other.token, guest, tenant.site_token, other.site_token):
        assert secret not in caplog.text


@pytest.mark.gen_test(timeout=60)
async def test_same_origin_stream_without_origin_header_uses_its_own_origin(
    api: Api, gateway: Gateway, sockets: Sockets, make_tenant: Any
) -> None:
    own = f"http://127.0.0.1:{gateway.port}"
    tenant = make_tenant([own])
    dialog_id, guest = await api.widget_dialog(tenant, origin=own)
    url = sse_url(sockets.widget_url(tenant, dialog_id, guest))
    body = await raw_stream(url, {"Sec-Fetch-Site": "same-origin"}, until=b'"ready"')
    assert b'"type":"ready"' in body, body
    body = await raw_stream(url, {"Sec-Fetch-Site": "cross-site"}, until=b"\0")
    assert b'"code":4003' in body


# -- counting, limits, keep-alive, inbox ------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_metrics_and_status_count_streams_by_transport(
    api: Api, gateway: Gateway, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                       origin=tenant.domains[0], **SSE)
    await sockets.open(sockets.admin_url(tenant, dialog_id))
    base = f"http://127.0.0.1:{gateway.port}"
    text = (await AsyncHTTPClient().fetch(base + "/metrics")).body.decode()
    assert 'replyx_connections{kind="widget",transport="sse"} 1.0' in text
    assert 'replyx_connections{kind="admin",transport="ws"} 1.0' in text
    assert 'replyx_sockets{kind="widget"} 1.0' in text
    code, status = await get_json(base + "/api/debug/websocket/status")
    assert code == 200 and status["transports"] == {"ws": 1, "sse": 1}


@pytest.mark.gen_test(timeout=60)
async def test_streams_count_against_the_per_address_cap(
    api: Api, tenant: Tenant, database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "var", REPLYX_MAX_SOCKETS_PER_IP="2")
    gateway = Gateway(settings, database_url)
    await gateway.start(port=0, host="127.0.0.1")
    sockets = Sockets(f"ws://127.0.0.1:{gateway.port}")
    try:
        dialog_id = await api.site_dialog(tenant)
        await sockets.open(sockets.site_url(tenant, dialog_id))
        await sockets.open(sockets.site_url(tenant, dialog_id), **SSE)
        body = await raw_stream(sse_url(sockets.site_url(tenant, dialog_id)), until=b"\0")
        assert b'event: close\ndata: {"code":1008,' in body
    finally:
        await sockets.close_all()
        await gateway.stop()


@pytest.mark.gen_test(timeout=60)
async def test_idle_stream_gets_keep_alive_comments(
    api: Api, gateway: Gateway, sockets: Sockets, tenant: Tenant
) -> None:
    gateway.started.streams.keep_alive_interval = 0.2
    dialog_id = await api.site_dialog(tenant)
    client = await sockets.open(sockets.site_url(tenant, dialog_id), **SSE)
    conn = client._conn
    # Comments are not frames: nothing wakes wait_until, so poll.
    await eventually(lambda: getattr(conn, "comments", 0) >= 3, "keep-alives", 10)


@pytest.mark.gen_test(timeout=60)
async def test_a_stream_that_gets_events_gets_no_keep_alives(
    api: Api, gateway: Gateway, sockets: Sockets, tenant: Tenant
) -> None:
    gateway.started.streams.keep_alive_interval = 0.2
    busy, idle = await api.site_dialog(tenant), await api.site_dialog(tenant)
    busy_client = await sockets.open(sockets.site_url(tenant, busy), **SSE)
    idle_client = await sockets.open(sockets.site_url(tenant, idle), **SSE)
    for i in range(30):  # an event every 50 ms for 1.5 s: 7 keep-alive intervals
        await api.post_site(tenant, busy, f"m{i}")
        await asyncio.sleep(0.05)
    await busy_client.wait_for_seq(30)
    assert getattr(idle_client._conn, "comments", 0) >= 4
    assert getattr(busy_client._conn, "comments", 0) == 0


def test_keep_alives_visit_a_slice_of_the_streams_per_tick() -> None:
    """2,000 streams kept alive in one callback held every frame back tens of ms."""

    class Idle:
        written_tick = 0
        kept = 0

        def keep_alive(self) -> None:
            self.kept += 1

    streams = Streams(keep_alive=10.0)
    idle, busy, gone = [Idle() for _ in range(95)], Idle(), Idle()
    for stream in [*idle, busy, gone]:
        streams.add(stream)
    streams.discard(gone)
    try:
        written = []
        for _ in range(3 * SLICES):
            busy.written_tick = streams.ticks  # it wrote an event in every tick
            before = sum(s.kept for s in idle)
            streams._tick()
            written.append(sum(s.kept for s in idle) - before)
    finally:
        streams.close()
    assert max(written) <= 10  # a tenth of the 96 open streams, rounded up
    assert all(s.kept in (2, 3) for s in idle), [s.kept for s in idle]  # once per interval
    assert busy.kept == 0 and gone.kept == 0


@pytest.mark.gen_test(timeout=60)
async def test_fan_out_renders_each_event_once_for_all_streams(
    api: Api, gateway: Gateway, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id = await api.site_dialog(tenant)
    clients = [await sockets.open(sockets.site_url(tenant, dialog_id), **SSE)
               for _ in range(8)]
    await asyncio.sleep(0.3)  # presence frames (one per stream) have gone out
    streams = gateway.started.streams
    before = streams.rendered
    for i in range(3):
        await api.post_site(tenant, dialog_id, f"m{i}")
    for client in clients:
        await client.wait_for_seq(3)
    assert streams.rendered - before == 3


@pytest.mark.gen_test(timeout=60)
async def test_inbox_over_sse_snapshot_then_live(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id = await api.site_dialog(tenant)
    inbox = InboxClient(f"{sockets.base}/ws/inbox?token={quote(tenant.token)}", **SSE)
    sockets.clients.append(await inbox.connect())
    assert inbox.snapshots == 1 and dialog_id in inbox.dialogs
    await api.post_site(tenant, dialog_id, "hello inbox")
    await inbox.wait_until(lambda: inbox.dialogs[dialog_id]["last_seq"] == 1, 10, "update")



def test_rendering_of_frames_as_events() -> None:
    for size in (10, 200, 70_000):  # the three RFC 6455 length encodings
        payload = b'{"type":"message","seq":7,"text":"%s"}' % (b"x" * size)
        assert render(ws_payload(text_frame(payload))) == b"id: 7\ndata: " + payload + b"\n\n"
    assert render(b'{"type":"ready","dialog_id":1,"last_seq":0}').startswith(b"id: 0\n")
    assert render(b'{"type":"ready"}') == b'data: {"type":"ready"}\n\n'  # the inbox's: no id
    assert render(b'{"type":"read","dialog_id":1,"side":"visitor","seq":3}').startswith(b"data:")
    # Raw line breaks between JSON tokens (a hand-made NOTIFY): one data line each.
    assert render(b'{"type":"message",\r\n"seq":3}') == (
        b'id: 3\ndata: {"type":"message",\ndata: "seq":3}\n\n')
    assert close_event(4008, "slow") == b'event: close\ndata: {"code":4008,"reason":"slow"}\n\n'
