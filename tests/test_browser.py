"""The seed's end-to-end test: the operator panel and the widget pages at once in Chromium,
across a gateway restart, on the shared production-like stack (``ops`` in tests/fix_stack.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fix_stack import Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def test_admin_and_widget_pages_in_chromium_see_every_message_across_a_gateway_restart(
    ops: Stack, make_tenant: Any
) -> None:
    """The seed's E2E: the operator panel and the widget at once, in a real browser."""
    from playwright.sync_api import Page, expect, sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is not installed: apt-get install chromium"
    # The pages are served through nginx; their origin must be one of the assistant's domains.
    tenant = make_tenant([ops.nginx])
    timeout = 30_000  # ms; generous, the machine is shared

    def send(page: Page, text: str) -> None:
        page.fill("#text", text)
        page.press("#text", "Enter")
        # The input clears once the API answered 201; the message itself comes by socket.
        expect(page.locator("#text")).to_have_value("", timeout=timeout)

    def seqs(page: Page) -> list[int]:
        return page.eval_on_selector_all("#messages li",
                                          "els => els.map(e => Number(e.dataset.seq))")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            errors: list[str] = []
            widget, admin = context.new_page(), context.new_page()
            for page in (widget, admin):
                page.on("pageerror", lambda exc: errors.append(str(exc)))

            widget.goto(f"{ops.nginx}/demo/widget.html?assistant_id={tenant.assistant_id}")
            expect(widget.locator("#status")).to_have_text("live", timeout=timeout)
            dialog_id = widget.locator("#dialog").get_attribute("data-dialog")
            admin.goto(f"{ops.nginx}/demo/admin.html#dialog={dialog_id}")
            admin.fill("#email", tenant.email)
            admin.fill("#password", tenant.password)
            admin.click("#login-button")
            expect(admin.locator("#status")).to_have_text("live", timeout=timeout)

            sent: list[str] = []
            for i in range(2):
                for page, who in ((widget, "visitor"), (admin, "operator")):
                    send(page, f"{who} {i}")
                    sent.append(f"{who} {i}")
            for page in (widget, admin):
                expect(page.locator("#messages li .text")).to_have_text(sent, timeout=timeout)

            # Typing travels the same way, and is not stored.
            admin.fill("#text", "thinking")
            expect(widget.locator("#typing")).to_have_text("operator is typing…",
                                                           timeout=timeout)
            admin.fill("#text", "")

            # The gateway goes down: both pages notice and keep retrying; the API (the
            # backend) still takes messages, from both pages.
            ops.ctl("stop", "gateway")
            for page in (widget, admin):
                expect(page.locator("#status")).to_have_text("reconnecting", timeout=timeout)
            for page, who in ((widget, "visitor"), (admin, "operator")):
                send(page, f"{who} while the gateway is down")
                sent.append(f"{who} while the gateway is down")
            ops.ctl("start", "gateway")

            # Both resume with since=<last seq>: what was missed arrives, nothing twice.
            for page in (widget, admin):
                expect(page.locator("#status")).to_have_text("live", timeout=timeout)
            for page, who in ((widget, "visitor"), (admin, "operator")):
                send(page, f"{who} after the restart")
                sent.append(f"{who} after the restart")
            for page in (widget, admin):
                expect(page.locator("#messages li .text")).to_have_text(sent, timeout=timeout)
                assert seqs(page) == list(range(1, len(sent) + 1))
                # The gateway closed them with 1012 "restarting, resume with since".
                assert 1012 in page.evaluate("window.replyxDialog.closeCodes")
            assert errors == []
            credentials = [
                admin.evaluate("sessionStorage.getItem('replyx.operator_token')"),
                widget.evaluate(f"JSON.parse(localStorage.getItem('replyx.widget.{tenant.assistant_id}'))"
                                ".guest_token"),
            ]
        finally:
            browser.close()

    # While the gateway was down nginx logged each failed upstream connect, quoting the
    # request line; the query values were cut before the line reached log/nginx.log.
    assert "connect() failed" in ops.logs("nginx")
    assert "guest_token=…" in ops.logs("nginx")
    for path in (ops.data_dir / "log").iterdir():
        text = path.read_text(errors="replace")
        for credential in credentials:
            assert credential and credential not in text, path
