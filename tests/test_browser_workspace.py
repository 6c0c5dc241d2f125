"""The operator's workspace in a real browser: the demo panel's live inbox (unread badges,
the visitor's dot, "seen" ticks, paging) and the demo widget's presence and "seen", on a
real `replyx run` stack behind nginx, in headless Chromium (Playwright).

What the pages draw comes from replyx.js: ReplyX.Inbox on /ws/inbox for the list, the
dialog sockets' `read` and `presence` events, and Api.read / Api.widgetRead / Api.dialogs.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from replyx_ops.stack import nginx_available
from tests.fix_db import Tenant
from tests.fix_stack import Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT = 30_000  # ms; generous, the machine is shared
# Presence: an operator or visitor who leaves counts for 5 s more (the debounce), and each
# socket gets at most one presence frame a second; leave room for a loaded machine.
PRESENCE_TIMEOUT = 20_000
VISITOR_MESSAGE = "INSERT INTO messages (dialog_id, sender, text) VALUES (%s, 'visitor', %s)"


@pytest.fixture(scope="module")
def web(stack: Stack) -> Stack:
    assert nginx_available(), "nginx is not installed: apt-get install nginx-light (.ci/run does)"
    assert Path(CHROMIUM).exists(), "chromium is not installed: apt-get install chromium"
    return stack


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def dialogs_api(stack: Stack, tenant: Tenant) -> dict[int, dict[str, Any]]:
    """GET /api/dialogs: the operator's dialogs as the database has them."""
    request = urllib.request.Request(  # noqa: S310 (the stack's own http:// URL)
        stack.api + "/api/dialogs?limit=1000", headers={"Authorization": f"Bearer {tenant.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return {d["dialog_id"]: d for d in json.loads(response.read())["dialogs"]}


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def log_in(page: Any, stack: Stack, tenant: Tenant) -> None:
    from playwright.sync_api import expect

    page.goto(f"{stack.nginx}/demo/admin.html")
    page.fill("#email", tenant.email)
    page.fill("#password", tenant.password)
    page.click("#login-button")
    expect(page.locator("#inbox-status")).to_have_text("inbox live", timeout=TIMEOUT)


def send(page: Any, text: str) -> None:
    from playwright.sync_api import expect

    page.fill("#text", text)
    page.press("#text", "Enter")
    # The input clears once the API answered 201; the message itself comes by socket.
    expect(page.locator("#text")).to_have_value("", timeout=TIMEOUT)


def test_panel_inbox_is_live_badges_clear_when_read_and_both_sides_see_seen_and_presence(
    web: Stack, make_tenant: Any, browser: Any
) -> None:
    from playwright.sync_api import expect

    tenant = make_tenant([web.nginx])  # the pages' origin is the assistant's domain
    context = browser.new_context()
    errors: list[str] = []
    context.on("weberror", lambda error: errors.append(str(error.error)))

    # The operator's panel is open first, with nothing in it yet.
    admin = context.new_page()
    log_in(admin, web, tenant)
    expect(admin.locator("#dialogs-empty")).to_be_visible(timeout=TIMEOUT)
    expect(admin.locator("#refresh")).to_have_count(0)
    # Whatever happens next must reach this page as it is: no reload, no click.
    admin.evaluate("window.__untouched = true")

    # A visitor opens the widget: a new dialog, which the panel shows by itself.
    widget = context.new_page()
    widget.goto(f"{web.nginx}/demo/widget.html?assistant_id={tenant.assistant_id}")
    expect(widget.locator("#status")).to_have_text("live", timeout=TIMEOUT)
    dialog_id = int(widget.locator("#dialog").get_attribute("data-dialog") or 0)
    row = admin.locator(f'#dialogs li[data-dialog="{dialog_id}"]')
    badge = row.locator(".badge")
    dot = row.locator(".dot")
    expect(row).to_be_visible(timeout=TIMEOUT)
    expect(badge).to_be_hidden()
    # The visitor is on the page; an operator is online (the panel's inbox socket).
    expect(dot).to_be_visible(timeout=PRESENCE_TIMEOUT)
    expect(widget.locator("#operators")).to_have_text("operator online", timeout=PRESENCE_TIMEOUT)

    # Each visitor message counts up the badge.
    for n in (1, 2, 3):
        send(widget, f"visitor {n}")
        expect(badge).to_have_text(str(n), timeout=TIMEOUT)
        expect(row.locator(".preview")).to_have_text(f"visitor: visitor {n}", timeout=TIMEOUT)
    assert admin.evaluate("window.__untouched") is True
    # Nobody has read them: no "seen" on the widget.
    expect(widget.locator("#messages li.seen")).to_have_count(0)

    # The operator opens the dialog: it is read up to its last message, the badge clears,
    # and the widget ticks its three messages "seen" (a read frame of the operator side).
    row.locator("button").click()
    expect(admin.locator("#status")).to_have_text("live", timeout=TIMEOUT)
    expect(admin.locator("#messages li")).to_have_count(3, timeout=TIMEOUT)
    expect(badge).to_be_hidden(timeout=TIMEOUT)
    expect(row).to_have_attribute("data-unread", "0")
    expect(widget.locator("#messages li.seen")).to_have_count(3, timeout=TIMEOUT)
    expect(widget.locator("#messages li.seen .tick").first).to_have_text("✓ seen")
    assert dialogs_api(web, tenant)[dialog_id]["operator_read_seq"] == 3
    expect(admin.locator("#visitor")).to_have_text("visitor on the page", timeout=TIMEOUT)

    # The operator answers; the widget, visible, reads it: the panel ticks it "seen".
    send(admin, "operator here")
    expect(widget.locator("#messages li .text")).to_have_text(
        ["visitor 1", "visitor 2", "visitor 3", "operator here"], timeout=TIMEOUT)
    expect(admin.locator("#messages li.operator.seen")).to_have_count(1, timeout=TIMEOUT)
    wait_for(lambda: dialogs_api(web, tenant)[dialog_id]["visitor_read_seq"] == 4)

    # A visitor message while the dialog is open is read again at once.
    send(widget, "visitor 4")
    expect(admin.locator("#messages li")).to_have_count(5, timeout=TIMEOUT)
    expect(widget.locator("#messages li.seen")).to_have_count(4, timeout=TIMEOUT)
    wait_for(lambda: dialogs_api(web, tenant)[dialog_id]["operator_read_seq"] == 5)
    expect(badge).to_be_hidden(timeout=TIMEOUT)

    # The visitor leaves: after the debounce the dot goes, in the list and the open dialog.
    widget.close()
    expect(dot).to_be_hidden(timeout=PRESENCE_TIMEOUT)
    expect(admin.locator("#visitor")).to_have_text("visitor away", timeout=TIMEOUT)

    # The visitor comes back (the same dialog, kept in localStorage).
    widget = context.new_page()
    widget.goto(f"{web.nginx}/demo/widget.html?assistant_id={tenant.assistant_id}")
    expect(widget.locator("#status")).to_have_text("live", timeout=TIMEOUT)
    assert widget.locator("#dialog").get_attribute("data-dialog") == str(dialog_id)
    expect(dot).to_be_visible(timeout=PRESENCE_TIMEOUT)
    expect(widget.locator("#operators")).to_have_text("operator online", timeout=PRESENCE_TIMEOUT)

    # The operator's page closes: the widget shows "offline" once the debounce has passed.
    admin.close()
    expect(widget.locator("#operators")).to_have_text("operator offline",
                                                      timeout=PRESENCE_TIMEOUT)
    assert widget.locator("#operators").get_attribute("data-count") == "0"
    assert admin.is_closed()
    assert errors == []
    context.close()


def test_panel_pages_older_dialogs_and_shows_any_writers_dialogs_live(
    web: Stack, make_tenant: Any, browser: Any, sql: psycopg.Connection[Any]
) -> None:
    from playwright.sync_api import expect

    tenant = make_tenant([web.nginx])
    # More dialogs than the inbox's snapshot holds (100), written as psql would.
    sql.execute(
        "INSERT INTO dialogs (assistant_id, channel)"
        " SELECT %s, 'site' FROM generate_series(1, 105)",
        (tenant.assistant_id,),
    )
    ids = [r[0] for r in sql.execute(
        "SELECT id FROM dialogs WHERE assistant_id = %s ORDER BY activity DESC",
        (tenant.assistant_id,),
    )]
    assert len(ids) == 105

    context = browser.new_context()
    errors: list[str] = []
    context.on("weberror", lambda error: errors.append(str(error.error)))
    admin = context.new_page()
    log_in(admin, web, tenant)
    rows = admin.locator("#dialogs li")
    expect(rows).to_have_count(100, timeout=TIMEOUT)
    expect(admin.locator("#total")).to_have_text("100 of 105")
    expect(admin.locator("#older")).to_be_visible()
    assert admin.eval_on_selector_all(
        "#dialogs li", "els => els.map(e => Number(e.dataset.dialog))") == ids[:100]

    # "older" pages back over GET /api/dialogs?before=: the rest, in order, and no more.
    admin.click("#older")
    expect(rows).to_have_count(105, timeout=TIMEOUT)
    expect(admin.locator("#older")).to_be_hidden()
    assert admin.eval_on_selector_all(
        "#dialogs li", "els => els.map(e => Number(e.dataset.dialog))") == ids

    # Any writer: a message typed in psql into the oldest dialog moves it to the top with
    # its badge; a dialog created in psql appears on top of that.
    oldest = ids[-1]
    sql.execute(VISITOR_MESSAGE, (oldest, "from psql"))
    expect(rows.first).to_have_attribute("data-dialog", str(oldest), timeout=TIMEOUT)
    expect(rows.first.locator(".badge")).to_have_text("1")
    created = sql.execute(
        "INSERT INTO dialogs (assistant_id, channel) VALUES (%s, 'site') RETURNING id",
        (tenant.assistant_id,),
    ).fetchone()
    assert created is not None
    new_id = created[0]
    expect(rows.first).to_have_attribute("data-dialog", str(new_id), timeout=TIMEOUT)
    expect(rows).to_have_count(106)
    expect(admin.locator("#total")).to_have_text("106 of 106")

    # The gateway restarts (1012) while a message is written: the inbox reconnects by
    # itself and its fresh snapshot replaces the view (the newest 100 again, "older" back).
    web.ctl("stop", "gateway")
    expect(admin.locator("#inbox-status")).to_have_text("inbox reconnecting", timeout=TIMEOUT)
    second = ids[-2]
    sql.execute(VISITOR_MESSAGE, (second, "while down"))
    web.ctl("start", "gateway")
    expect(admin.locator("#inbox-status")).to_have_text("inbox live", timeout=TIMEOUT)
    expect(rows.first).to_have_attribute("data-dialog", str(second), timeout=TIMEOUT)
    expect(rows.first.locator(".badge")).to_have_text("1")
    expect(rows).to_have_count(100)
    expect(admin.locator("#total")).to_have_text("100 of 106")
    expect(admin.locator("#older")).to_be_visible()
    assert admin.evaluate("window.replyxInbox.snapshots") == 2
    assert 1012 in admin.evaluate("window.replyxInbox.closeCodes")
    assert errors == []
    context.close()
