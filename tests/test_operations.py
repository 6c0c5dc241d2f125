"""Run it like production: `replyx check`, metrics, logs, supervisord and nginx, for real.

One `replyx run` stack (supervisord, gunicorn with 4 workers, the gateway, nginx) serves
the module; tests that break a part of it put it back before they end.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from replyx.pg import EmbeddedPostgres
from replyx_ops.stack import nginx_available
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant, child_environ
from tests.fix_stack import BIN, Stack
from tests.net import free_port, wait_http

LOG_MAX_BYTES = 32 * 1024
LOG_BACKUPS = 3

HEALTHY = [
    "postgres", "schema", "triggers", "listen/notify", "gateway listener",
    "backend health", "gateway health", "backend workers", "gateway process",
    "nginx", "nginx /api/", "nginx /ws/",
]


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Stack]:
    assert nginx_available(), "nginx is not installed: apt-get install nginx-light (.ci/run does)"
    stack = Stack(
        tmp_path_factory.mktemp("ops"), database_url,
        REPLYX_LOG_MAX_BYTES=str(LOG_MAX_BYTES), REPLYX_LOG_BACKUPS=str(LOG_BACKUPS),
    ).start("--no-demo")
    yield stack
    stack.stop()


def check(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    result = stack.cli("check", "--json", *args)
    assert result.stdout, result.stderr
    report = orjson.loads(result.stdout)
    return result.returncode, report


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def failed(report: dict[str, Any]) -> set[str]:
    return {name for name, status in statuses(report).items() if status == "fail"}


def wait_healthy(stack: Stack) -> None:
    for url in (stack.api + "/health", stack.gateway + "/health", stack.nginx + "/health"):
        wait_http(url, timeout=60)


def logs(stack: Stack, name: str) -> str:
    """A program's log with its rotated files, oldest first."""
    log_dir = stack.data_dir / "log"
    files = sorted(log_dir.glob(f"{name}.log.*"), key=lambda p: -int(p.suffix[1:]))
    return "".join(p.read_text(errors="replace") for p in [*files, log_dir / f"{name}.log"]
                   if p.exists())


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def fetch_text(url: str, **headers: str) -> tuple[int, str]:
    response = await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False)
    return response.code, (response.body or b"").decode()


# -- replyx check -------------------------------------------------------------------


def test_check_passes_on_a_healthy_stack(ops: Stack) -> None:
    result = ops.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"replyx check: all {len(HEALTHY)} checks passed"
    assert [line.split()[0] for line in lines[:-1]] == ["PASS"] * len(HEALTHY)
    assert "gunicorn master" in result.stdout and "with 4 workers" in result.stdout

    code, report = check(ops)
    assert code == 0 and report["ok"] is True
    assert list(statuses(report)) == HEALTHY
    assert set(statuses(report).values()) == {"pass"}


@pytest.mark.parametrize(
    ("program", "broken"),
    [
        ("gateway", {"gateway listener", "gateway health", "gateway process", "nginx /ws/"}),
        ("backend", {"backend health", "backend workers", "nginx /api/"}),
        ("nginx", {"nginx", "nginx /api/", "nginx /ws/"}),
    ],
)
def test_check_names_each_stopped_part_and_how_to_fix_it(
    ops: Stack, program: str, broken: set[str]
) -> None:
    ops.ctl("stop", program)
    try:
        code, report = check(ops)
    finally:
        ops.ctl("start", program)
        wait_healthy(ops)
    assert code == 1 and report["ok"] is False
    assert failed(report) == broken
    for c in report["checks"]:
        if c["status"] == "fail":
            assert c["hint"], c
    assert any(f"replyx ctl start {program}" in c["hint"] for c in report["checks"])


def test_check_finds_a_schema_behind_and_a_disabled_trigger(
    ops: Stack, sql: psycopg.Connection[Any]
) -> None:
    (revision,) = sql.execute("SELECT version_num FROM alembic_version").fetchone()
    sql.execute("UPDATE alembic_version SET version_num = '0000_older'")
    try:
        code, report = check(ops)
    finally:
        sql.execute("UPDATE alembic_version SET version_num = %s", (revision,))
    assert code == 1 and failed(report) == {"schema"}
    schema = next(c for c in report["checks"] if c["name"] == "schema")
    assert "0000_older" in schema["detail"] and schema["hint"] == "run `replyx migrate`"

    sql.execute("ALTER TABLE messages DISABLE TRIGGER messages_notify")
    try:
        code, report = check(ops)
    finally:
        sql.execute("ALTER TABLE messages ENABLE TRIGGER messages_notify")
    assert code == 1 and failed(report) == {"triggers"}
    triggers = next(c for c in report["checks"] if c["name"] == "triggers")
    assert "messages_notify" in triggers["detail"]
    assert "ENABLE TRIGGER messages_notify" in triggers["hint"]


def test_check_without_a_stack_fails_and_starts_nothing(tmp_path: Path) -> None:
    import subprocess

    env = child_environ(REPLYX_DATA_DIR=str(tmp_path / "var"), BACKEND_PORT=str(free_port()),
                        GATEWAY_PORT=str(free_port()), NGINX_PORT=str(free_port()))
    result = subprocess.run([str(BIN / "replyx"), "check", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    report = orjson.loads(result.stdout)
    states = statuses(report)
    assert states["postgres"] == "fail"
    assert "replyx run" in report["checks"][0]["hint"]
    for name in ("schema", "triggers", "listen/notify", "gateway listener"):
        assert states[name] == "skip"
    for name in ("backend health", "gateway health", "backend workers", "gateway process"):
        assert states[name] == "fail"
    assert states["nginx"] == "skip"  # no supervisord says it is configured

    # For people: one line per check, the hint under each failure, a summary last.
    result = subprocess.run([str(BIN / "replyx"), "check"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  postgres ")
    assert lines[1].split() == ["hint:", *report["checks"][0]["hint"].split()]
    assert lines[-1] == "replyx check: 5 of 10 checks failed"
    # It only looks: no embedded Postgres was created or started.
    assert not EmbeddedPostgres(tmp_path / "var").is_running()
    assert not (tmp_path / "var" / "pg").exists()


# -- metrics -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_backend_metrics_count_requests_of_all_four_workers(
    ops: Stack, tenant: Tenant
) -> None:
    key = ("replyx_backend_requests_total",
           (("code", "401"), ("method", "GET"), ("route", "/api/dialogs")))
    _, before_text = await fetch_text(ops.api + "/metrics")
    before = metrics(before_text).get(key, 0.0)

    # A new connection per request, so gunicorn spreads them over its workers.
    http = AsyncHTTPClient(force_instance=True, max_clients=20)

    async def one() -> str:
        response = await http.fetch(HTTPRequest(
            ops.api + "/api/dialogs", headers={"Connection": "close"}), raise_error=False)
        assert response.code == 401
        return response.headers["X-Replyx-Worker"]

    workers: Counter[str] = Counter()
    for _ in range(10):  # until at least two workers answered (the kernel picks who accepts)
        workers.update(await asyncio.gather(*(one() for _ in range(20))))
        if len(workers) >= 2:
            break
    http.close()
    sent = sum(workers.values())
    assert len(workers) >= 2, workers

    # Whichever worker answers /metrics, it reports the sum over all of them.
    for _ in range(3):
        code, text = await fetch_text(ops.api + "/metrics")
        assert code == 200
        samples = metrics(text)
        assert samples[key] - before == sent
        assert samples[("replyx_backend_workers", ())] == 4
    duration = ("replyx_backend_request_duration_seconds_count",
                (("method", "GET"), ("route", "/api/dialogs")))
    assert samples[duration] >= sent

    # Same rule as the gateway: through a proxy, only with an operator token.
    proxied = {"X-Forwarded-For": "203.0.113.9"}
    assert (await fetch_text(ops.api + "/metrics", **proxied))[0] == 401
    code, _ = await fetch_text(ops.api + "/metrics", Authorization=f"Bearer {tenant.token}",
                               **proxied)
    assert code == 200
    # nginx does not expose /metrics at all.
    assert (await fetch_text(ops.nginx + "/metrics"))[0] == 404


GATEWAY_FAMILIES = {
    "replyx_sockets": "gauge",
    "replyx_listener_up": "gauge",
    "replyx_dialogs_watched": "gauge",
    "replyx_notification_queue_length": "gauge",
    "replyx_resyncing_dialogs": "gauge",
    "replyx_frames_sent": "counter",
    "replyx_frames_replayed": "counter",
    "replyx_messages_routed": "counter",
    "replyx_notifications": "counter",
    "replyx_bad_notifications": "counter",
    "replyx_slow_consumers_dropped": "counter",
    "replyx_listener_reconnects": "counter",
    "replyx_refused_handshakes": "counter",
    "replyx_notification_lag_seconds": "histogram",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}
BACKEND_FAMILIES = {
    "replyx_backend_requests": "counter",
    "replyx_backend_request_duration_seconds": "histogram",
    "replyx_backend_workers": "gauge",
}


@pytest.mark.gen_test(timeout=60)
async def test_metric_names_follow_prometheus_conventions(ops: Stack, tenant: Tenant) -> None:
    api, sockets = Api(ops.api), Sockets(ops.ws)
    dialog_id = await api.site_dialog(tenant)
    site = await sockets.open(sockets.site_url(tenant, dialog_id))
    assert await sockets.refused(sockets.admin_url(tenant, 999999999)) == 4004
    await api.post_site(tenant, dialog_id, "measured")
    await site.wait_for_seq(1)

    for url, expected in ((ops.gateway + "/metrics", GATEWAY_FAMILIES),
                          (ops.api + "/metrics", BACKEND_FAMILIES)):
        code, text = await fetch_text(url)
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, kind in expected.items():
            assert name in families, (url, name)
            assert families[name].type == kind, (name, families[name].type)
        for family in families.values():
            if family.name.endswith("_created"):
                continue  # prometheus-client's creation timestamps of counters and histograms
            assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
            assert family.documentation, family.name
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
            assert not family.name.endswith("_total")
            if "lag" in family.name or "duration" in family.name:
                assert family.name.endswith("_seconds"), family.name
    samples = metrics((await fetch_text(ops.gateway + "/metrics"))[1])
    # Every refusal code is there from the start (0 until it happens), so rate() works.
    for code_ in ("4001", "4003", "4004"):
        assert ("replyx_refused_handshakes_total", (("code", code_),)) in samples
    assert samples[("replyx_refused_handshakes_total", (("code", "4004"),))] >= 1
    assert samples[("replyx_sockets", (("kind", "site"),))] == 1
    assert samples[("replyx_listener_up", ())] == 1
    assert samples[("replyx_messages_routed_total", ())] >= 1
    await sockets.close_all()


# -- supervisord and nginx -------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_restarting_the_backend_leaves_sockets_open(ops: Stack, tenant: Tenant) -> None:
    api, sockets = Api(ops.api), Sockets(ops.ws)
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    site = await sockets.open(sockets.site_url(tenant, dialog_id))
    before = await api.post_widget(dialog_id, guest, "before the restart")
    old_master = ops.ctl("pid", "backend").strip()

    # supervisorctl blocks until the new gunicorn master is RUNNING.
    await asyncio.get_running_loop().run_in_executor(None, ops.ctl, "restart", "backend")
    assert ops.ctl("pid", "backend").strip() != old_master
    await asyncio.get_running_loop().run_in_executor(None, wait_http, ops.api + "/health")

    after = await api.post_operator(tenant, dialog_id, "after the restart")
    for client in (admin, widget, site):
        await client.wait_for_seq(2, timeout=30)
        assert client.messages == [before, after]
        # The same connection throughout: never closed, never reconnected.
        assert client.close_codes == [] and client.connects == 1
    await sockets.close_all()


@pytest.mark.gen_test(timeout=60)
async def test_nginx_routes_api_and_websockets(ops: Stack, tenant: Tenant) -> None:
    api = Api(ops.nginx)
    sockets = Sockets(ops.nginx.replace("http://", "ws://"))
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    sent = [await api.post_widget(dialog_id, guest, "through nginx"),
            await api.post_operator(tenant, dialog_id, "answered through nginx")]
    for client in (admin, widget):
        await client.wait_for_seq(2)
        assert client.messages == sent
    # The origin rule holds behind the proxy too.
    assert await sockets.refused(sockets.widget_url(tenant, dialog_id, guest),
                                 origin="https://evil.example") == 4003

    # /health goes to the backend; the demo pages and replyx.js to the gateway.
    response = await api.request("GET", "/health")
    assert response.code == 200 and response.body["status"] == "ok"
    code, text = await fetch_text(ops.nginx + "/demo/replyx.js")
    assert code == 200 and "ReplyX" in text
    await sockets.close_all()

    # nginx's access lines reach log/nginx.log, with paths but never the query's tokens.
    deadline = time.monotonic() + 10
    while f"GET /ws/dialogs/{dialog_id} " not in logs(ops, "nginx"):
        assert time.monotonic() < deadline, logs(ops, "nginx")[-2000:]
        await asyncio.sleep(0.2)
    assert tenant.token not in logs(ops, "nginx") and guest not in logs(ops, "nginx")


# -- logs -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_logs_are_grep_able_under_the_data_dir_and_carry_no_token(
    ops: Stack, tenant: Tenant
) -> None:
    api, sockets = Api(ops.api), Sockets(ops.ws)
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest),
                                origin=tenant.domains[0])
    assert await sockets.refused(sockets.widget_url(tenant, dialog_id, guest),
                                 origin="https://evil.example") == 4003
    await api.post_widget(dialog_id, guest, "log me")
    # Tornado's own warnings quote the request URI: tokens in it must not reach the log.
    code, _ = await fetch_text(f"{ops.gateway}/api/debug/websocket/sync?dialog_id=x"
                               f"&token={tenant.token}")
    assert code == 400
    response = await api.request("PUT", f"/api/dialogs?token={tenant.token}", {})
    assert response.code == 405
    await admin.wait_for_seq(1)
    await widget.wait_for_seq(1)
    await sockets.close_all()

    expected = {
        "gateway": [
            rf"\[Admin\] connected dialog_id={dialog_id} ",
            rf"\[Widget\] connected dialog_id={dialog_id} ",
            rf"Broadcasting message dialog_id={dialog_id} seq=1 sockets=2",
            rf"\[Widget\] WEBSOCKET_4003_ERROR refused dialog_id={dialog_id} code=4003",
            rf"\[Admin\] disconnected dialog_id={dialog_id} code=\S+",
            rf"\[Widget\] disconnected dialog_id={dialog_id} code=\S+",
            r"400 GET /api/debug/websocket/sync\?dialog_id=…&token=… ",
        ],
        "backend": [
            rf"POST /api/widget/dialogs/{dialog_id}/messages ",
            r"Booting worker with pid",  # gunicorn's own lines land here too
            r"405 PUT /api/dialogs\?token=… ",
        ],
    }
    deadline = time.monotonic() + 15
    for name, patterns in expected.items():
        for pattern in patterns:
            while not re.search(pattern, logs(ops, name)):
                assert time.monotonic() < deadline, (name, pattern, logs(ops, name)[-3000:])
                await asyncio.sleep(0.2)
    # Grep as the seed's runbook does: one line per event, with dialog id and close code.
    refused = [line for line in logs(ops, "gateway").splitlines()
               if "WEBSOCKET_4003_ERROR" in line and f"dialog_id={dialog_id}" in line]
    assert len(refused) == 1 and "code=4003" in refused[0]

    secrets_ = [tenant.token, tenant.site_token, guest, tenant.password]
    for path in (ops.data_dir / "log").iterdir():
        text = path.read_text(errors="replace")
        for secret in secrets_:
            assert secret not in text, path


@pytest.mark.gen_test(timeout=60)
async def test_logs_rotate_at_the_configured_size(ops: Stack) -> None:
    log_dir = ops.data_dir / "log"
    http = AsyncHTTPClient(force_instance=True, max_clients=10)
    # Each bad request is one WARNING access line in gateway.log.
    url = ops.gateway + "/api/debug/websocket/sync?dialog_id=not-a-number"
    for _ in range(60):
        if (log_dir / "gateway.log.2").exists():
            break
        await asyncio.gather(*(http.fetch(url, raise_error=False) for _ in range(50)))
    http.close()
    assert (log_dir / "gateway.log.1").exists() and (log_dir / "gateway.log.2").exists()
    # supervisord rotates at REPLYX_LOG_MAX_BYTES and keeps REPLYX_LOG_BACKUPS old files.
    assert (log_dir / "gateway.log").stat().st_size <= LOG_MAX_BYTES
    assert not (log_dir / f"gateway.log.{LOG_BACKUPS + 1}").exists()


# -- the browser client ------------------------------------------------------------------

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
    assert "connect() failed" in logs(ops, "nginx")
    assert "guest_token=…" in logs(ops, "nginx")
    for path in (ops.data_dir / "log").iterdir():
        text = path.read_text(errors="replace")
        for credential in credentials:
            assert credential and credential not in text, path
