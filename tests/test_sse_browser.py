"""SSE through the real stack: nginx's /sse/ route, and the widget page in Chromium with no
WebSocket at all, living on server-sent events.

One ``replyx run`` stack (``tests/fix_stack.py``'s module ``stack``: supervisord,
gunicorn, the gateway, nginx) serves the module. The page's ``WebSocket``
constructor is removed before any script runs, so ``replyx.js`` goes straight
to EventSource on ``/sse/`` through nginx. The gateway then restarts: the
stream ends with ``event: close`` 1012, and the browser's *own* EventSource
reconnect (the same object, never replaced by replyx.js) resumes with
``Last-Event-ID`` — the gateway logs the resume point it got, which the page's
URL (``since=0``) could not have told it.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from replyx_client import DialogClient, DialogClosedError
from tests.consistency import assert_match_database
from tests.fix_apps import Api, Sockets
from tests.fix_stack import Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NO_WEBSOCKET = "delete window.WebSocket; window.WebSocket = undefined;"
# A network whose proxy breaks the upgrade: every socket fails before it opens (1006).
BLOCKED_UPGRADE = """
window.WebSocket = function (url) {
  var ws = this;
  ws.readyState = 0;
  ws.send = function () { throw new Error('not open'); };
  ws.close = function () {};
  setTimeout(function () {
    ws.readyState = 3;
    if (ws.onerror) ws.onerror({type: 'error'});
    if (ws.onclose) ws.onclose({code: 1006, reason: '', wasClean: false});
  }, 20);
};
"""


def gateway_log(stack: Stack) -> str:
    return logs(stack, "gateway")


def test_widget_without_websocket_gets_every_message_across_a_gateway_restart(
    stack: Stack, make_tenant: Any
) -> None:
    from playwright.sync_api import Page, expect, sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is not installed: apt-get install chromium"
    tenant = make_tenant([stack.nginx])
    timeout = 30_000

    def send(page: Page, text: str) -> None:
        page.fill("#text", text)
        page.press("#text", "Enter")
        expect(page.locator("#text")).to_have_value("", timeout=timeout)

    def operator(dialog_id: int, text: str) -> None:
        request = urllib.request.Request(  # noqa: S310
            f"{stack.nginx}/api/dialogs/{dialog_id}/messages", method="POST",
            data=orjson.dumps({"text": text}),
            headers={"Authorization": f"Bearer {tenant.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 201

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.add_init_script(NO_WEBSOCKET)
            errors: list[str] = []
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{stack.nginx}/demo/widget.html?assistant_id={tenant.assistant_id}")
            expect(page.locator("#status")).to_have_text("live", timeout=timeout)
            assert page.evaluate("typeof WebSocket") == "undefined"
            assert page.evaluate("window.replyxDialog.transportInUse") == "sse"
            dialog_id = int(page.locator("#dialog").get_attribute("data-dialog") or 0)

            sent: list[str] = []
            for i in range(3):
                send(page, f"visitor {i}")
                operator(dialog_id, f"operator {i}")
                sent += [f"visitor {i}", f"operator {i}"]
            expect(page.locator("#messages li .text")).to_have_text(sent, timeout=timeout)
            page.evaluate("window.replyxDialog._es.marker = 'the first EventSource'")
            before = len(sent)

            stack.ctl("stop", "gateway")
            expect(page.locator("#status")).to_have_text("reconnecting", timeout=timeout)
            for i in range(2):
                send(page, f"visitor while down {i}")
                operator(dialog_id, f"operator while down {i}")
                sent += [f"visitor while down {i}", f"operator while down {i}"]
            stack.ctl("start", "gateway")

            expect(page.locator("#status")).to_have_text("live", timeout=timeout)
            send(page, "visitor after the restart")
            sent.append("visitor after the restart")
            expect(page.locator("#messages li .text")).to_have_text(sent, timeout=timeout)
            seqs = page.eval_on_selector_all("#messages li",
                                             "els => els.map(e => Number(e.dataset.seq))")
            assert seqs == list(range(1, len(sent) + 1))
            dialog = page.evaluate(
                "({codes: window.replyxDialog.closeCodes, connects: window.replyxDialog.connects,"
                " marker: window.replyxDialog._es && window.replyxDialog._es.marker})")
            assert 1012 in dialog["codes"], dialog
            # The browser reconnected the same EventSource itself; replyx.js made no new one.
            assert dialog["marker"] == "the first EventSource" and dialog["connects"] >= 2
            assert errors == []
            guest = page.evaluate(
                f"JSON.parse(localStorage.getItem('replyx.widget.{tenant.assistant_id}'))"
                ".guest_token")
        finally:
            browser.close()

    # The resume point came in Last-Event-ID: the URL still says since=0.
    pattern = rf"\[Widget\] connected dialog_id={dialog_id} since={before} .*transport=sse"
    deadline = time.monotonic() + 10
    while not re.search(pattern, gateway_log(stack)):
        assert time.monotonic() < deadline, gateway_log(stack)[-3000:]
        time.sleep(0.2)
    for path in (stack.data_dir / "log").iterdir():
        text = path.read_text(errors="replace")
        for secret in (guest, tenant.token, tenant.site_token):
            assert secret not in text, path


def test_widget_falls_back_to_sse_when_the_upgrade_fails(stack: Stack, make_tenant: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    tenant = make_tenant([stack.nginx])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.add_init_script(BLOCKED_UPGRADE)
            page = context.new_page()
            page.goto(f"{stack.nginx}/demo/widget.html?assistant_id={tenant.assistant_id}")
            expect(page.locator("#status")).to_have_text("live", timeout=30_000)
            dialog = page.evaluate("({t: window.replyxDialog.transportInUse,"
                                   " codes: window.replyxDialog.closeCodes})")
            # One failed upgrade, then the event stream, with no help from the page.
            assert dialog == {"t": "sse", "codes": [1006]}
            page.fill("#text", "over the fallback")
            page.press("#text", "Enter")
            expect(page.locator("#messages li .text")).to_have_text(["over the fallback"],
                                                                    timeout=30_000)
        finally:
            browser.close()


def test_admin_page_without_websocket_lives_on_sse(stack: Stack, make_tenant: Any) -> None:
    """The operator panel too: the inbox (/sse/inbox) and the open dialog, no WebSocket."""
    from playwright.sync_api import expect, sync_playwright

    tenant = make_tenant([stack.nginx])
    timeout = 30_000
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.add_init_script(NO_WEBSOCKET)
            errors: list[str] = []
            widget, admin = context.new_page(), context.new_page()
            for page in (widget, admin):
                page.on("pageerror", lambda exc: errors.append(str(exc)))
            widget.goto(f"{stack.nginx}/demo/widget.html?assistant_id={tenant.assistant_id}")
            expect(widget.locator("#status")).to_have_text("live", timeout=timeout)
            dialog_id = widget.locator("#dialog").get_attribute("data-dialog")
            admin.goto(f"{stack.nginx}/demo/admin.html#dialog={dialog_id}")
            admin.fill("#email", tenant.email)
            admin.fill("#password", tenant.password)
            admin.click("#login-button")
            expect(admin.locator("#inbox-status")).to_have_text("inbox live", timeout=timeout)
            expect(admin.locator("#status")).to_have_text("live", timeout=timeout)
            for page, text in ((widget, "hello from the visitor"), (admin, "hello back")):
                page.fill("#text", text)
                page.press("#text", "Enter")
                expect(page.locator("#text")).to_have_value("", timeout=timeout)
            for page in (widget, admin):
                expect(page.locator("#messages li .text")).to_have_text(
                    ["hello from the visitor", "hello back"], timeout=timeout)
            assert admin.evaluate("window.replyxDialog.transportInUse") == "sse"
            assert errors == []
        finally:
            browser.close()


@pytest.mark.gen_test(timeout=60)
async def test_nginx_streams_sse_unbuffered_and_logs_no_token(
    stack: Stack, make_tenant: Any, database_url: str
) -> None:
    tenant = make_tenant()
    api = Api(stack.nginx)
    sockets = Sockets(stack.nginx.replace("http://", "ws://"))
    dialog_id, guest = await api.widget_dialog(tenant)
    clients = [
        await sockets.open(sockets.admin_url(tenant, dialog_id), transport="sse", since=0),
        await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                           origin=tenant.domains[0], transport="sse", since=0),
    ]
    for i in range(3):
        await api.post_widget(dialog_id, guest, f"through nginx {i}")
    await assert_match_database(database_url, dialog_id, clients)
    # The origin rule holds behind the proxy: one close event with the socket's code.
    assert await sockets.refused(sockets.widget_url(tenant, dialog_id, guest),
                                 origin="https://evil.example") == 4003
    refused = DialogClient(sockets.widget_url(tenant, dialog_id, guest), resume=False,
                           origin="https://evil.example", transport="sse")
    with pytest.raises(DialogClosedError) as closed:
        await refused.connect()
    assert closed.value.code == 4003

    # Not buffered, not compressed: the head and the first events arrive at once.
    host, port = "127.0.0.1", stack.nginx_port
    reader, writer = await asyncio.open_connection(host, port)
    path = DialogClient(sockets.admin_url(tenant, dialog_id), transport="sse").stream_url
    target = path.split(f":{port}", 1)[1]
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 "Accept-Encoding: gzip\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    body = await asyncio.wait_for(reader.readuntil(b'"type":"ready"'), 10)
    writer.close()
    assert b" 200 " in head.split(b"\r\n")[0] and b"text/event-stream" in head
    assert b"content-encoding" not in head.lower() and b"id: 3\ndata: {" in body
    await sockets.close_all()

    deadline = time.monotonic() + 10
    while f"GET /sse/widget/dialogs/{dialog_id} " not in logs(stack, "nginx"):
        assert time.monotonic() < deadline, logs(stack, "nginx")[-2000:]
        await asyncio.sleep(0.2)
    for name in ("nginx", "gateway"):
        for secret in (tenant.token, guest):
            assert secret not in logs(stack, name)


def logs(stack: Stack, name: str) -> str:
    path = stack.data_dir / "log" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""
