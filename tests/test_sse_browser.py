"""The widget page in Chromium with no WebSocket at all: it lives on server-sent events.

One ``replyx run`` stack (supervisord, gunicorn, the gateway, nginx) serves the
module. The page's ``WebSocket`` constructor is removed before any script runs,
so ``replyx.js`` goes straight to EventSource on ``/sse/`` through nginx. The
gateway then restarts: the stream ends with ``event: close`` 1012, and the
browser's *own* EventSource reconnect (the same object, never replaced by
replyx.js) resumes with ``Last-Event-ID`` — the gateway logs the resume point
it got, which the page's URL (``since=0``) could not have told it.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fix_stack import Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NO_WEBSOCKET = "delete window.WebSocket; window.WebSocket = undefined;"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("sse-browser"), database_url).start("--no-demo")
    yield s
    s.stop()


def gateway_log(stack: Stack) -> str:
    path = stack.data_dir / "log" / "gateway.log"
    return path.read_text(errors="replace") if path.exists() else ""


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
