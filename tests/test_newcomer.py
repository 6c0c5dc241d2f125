"""A newcomer's first hour (issue 14): what `make run` prints works as printed, on a bare machine.

One `replyx run --no-nginx` stack with its demo tenant serves the module: without
nginx the Python stand-in (replyx_ops.proxy) serves NGINX_PORT, as on a machine
where nginx is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
import pytest
from tornado.httpclient import AsyncHTTPClient

from replyx.settings import Settings
from replyx_client import DialogClient
from replyx_ops import demo, state
from tests.fix_apps import Api, Sockets
from tests.fix_db import TEST_JWT_SECRET, Tenant, create_tenant, make_settings, new_database
from tests.fix_stack import BIN, Stack
from ws_gateway.app import Gateway

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Stack]:
    # A database of its own: `replyx check` counts the gateways LISTENing on it, and other
    # modules' stacks on the shared test database would be counted too.
    with new_database(database_url, "replyx_bare") as url:
        stack = Stack(tmp_path_factory.mktemp("bare"), url).start("--no-nginx")
        yield stack
        stack.stop()


def replyx(*args: str, env: dict[str, str], cwd: Path | None = None,
           timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "replyx"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def bare_env(**extra: str) -> dict[str, str]:
    """An environment with none of the stack's settings: the command must find them."""
    names = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def demo_tenant(stack: Stack) -> dict[str, Any]:
    return orjson.loads((stack.data_dir / "demo.json").read_bytes())


# -- item 4: a second `replyx run` ---------------------------------------------------------


def test_a_second_run_says_a_stack_runs_and_starts_nothing(bare: Stack, tmp_path: Path) -> None:
    result = replyx("run", env=bare.env, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a stack is already running" in result.stderr
    assert str(bare.data_dir) in result.stderr and f"pid {bare.proc.pid}" in result.stderr
    assert f"backend http://127.0.0.1:{bare.backend_port}" in result.stderr
    assert "ReplyX realtime is up" not in result.stdout + result.stderr
    assert result.stdout == ""
    assert bare.healthy()

    # Another data dir on the same ports: refused before anything starts, naming the ports.
    other = tmp_path / "other"
    result = replyx("run", env={**bare.env, "REPLYX_DATA_DIR": str(other)}, timeout=30)
    assert result.returncode == 1
    assert f"BACKEND_PORT={bare.backend_port}" in result.stderr and "in use" in result.stderr
    assert "ReplyX realtime is up" not in result.stdout
    assert not (other / "pg").exists() and not (other / "log").exists()


# -- item 3: the demo tenant follows the ports; check finds them itself ----------------------


def test_check_finds_a_running_stacks_ports_and_database_itself(bare: Stack) -> None:
    # Only the data dir: no ports, no DATABASE_URL, no key.
    # (A generous probe timeout: what is checked here is where check looks, not how fast.)
    result = replyx("check", "--json", "--timeout", "15",
                    env=bare_env(REPLYX_DATA_DIR=str(bare.data_dir)))
    report = orjson.loads(result.stdout)
    assert result.returncode == 0, [c for c in report["checks"] if c["status"] != "pass"]
    states = {c["name"]: c["status"] for c in report["checks"]}
    assert states.pop("nginx") == "skip"
    assert set(states.values()) == {"pass"}, report
    backend = next(c for c in report["checks"] if c["name"] == "backend health")
    assert f":{bare.backend_port}/health" in backend["detail"]


def test_the_demo_tenant_follows_the_ports_it_runs_on(database_url: str, tmp_path: Path) -> None:
    first = make_settings(tmp_path, BACKEND_PORT="18000", GATEWAY_PORT="18001",
                          NGINX_PORT="18080")
    tenant = demo.ensure_demo_tenant(first, database_url)
    moved = make_settings(tmp_path, BACKEND_PORT="19000", GATEWAY_PORT="19001",
                          NGINX_PORT="19080")
    again = demo.ensure_demo_tenant(moved, database_url)
    assert again["assistant_id"] == tenant["assistant_id"]
    assert again["dialog_id"] == tenant["dialog_id"]
    with psycopg.connect(database_url) as conn:
        (domains,) = conn.execute("SELECT domains FROM assistants WHERE id = %s",
                                  (tenant["assistant_id"],)).fetchone()
    assert domains == demo.demo_origins(moved)
    assert "http://127.0.0.1:19001" in domains and not any("1800" in d for d in domains)


# -- item 9: the banner's three socket kinds are on one dialog ---------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_the_banner_opens_all_three_socket_kinds_on_one_dialog(bare: Stack) -> None:
    output = bare.run_output()
    tenant = demo_tenant(bare)
    wscat = re.findall(r'wscat (?:-H "Origin: (\S+)" )?-c "(\S+)"', output)
    assert len(wscat) == 3, output
    dialogs = {re.search(r"/dialogs/(\d+)\?", url).group(1) for _, url in wscat}
    assert dialogs == {str(tenant["dialog_id"])}
    assert [re.search(r"/ws/(\w+/)?dialogs", url).group(1) for _, url in wscat] == \
        [None, "widget/", "site/"]

    # Open them as printed: a message posted with the printed curl line reaches all three.
    clients = []
    for origin, url in wscat:
        clients.append(await Sockets(bare.ws).open(url, origin=origin or None))
    curl = re.search(r'curl -X POST "(\S+)"', output).group(1)
    r = await Api("").request("POST", curl, {"text": "Test message"})
    assert r.code == 201
    for client in clients:
        await client.wait_for_seq(r.body["seq"])
        assert client.messages[-1]["text"] == "Test message"
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_stand_in_front_streams_sse_unbuffered(bare: Stack) -> None:
    """Without nginx, /sse/ through NGINX_PORT works as through nginx: events as they come."""
    tenant = demo_tenant(bare)
    url = (f"ws://127.0.0.1:{bare.nginx_port}/ws/site/dialogs/{tenant['dialog_id']}"
           f"?site_token={quote(tenant['site_token'])}")
    client = DialogClient(url, transport="sse")
    await client.connect()
    try:
        r = await Api(f"http://127.0.0.1:{bare.nginx_port}").request(
            "POST", f"/api/site/dialogs/{tenant['dialog_id']}/messages"
            f"?site_token={quote(tenant['site_token'])}", {"text": "through the stand-in"})
        assert r.code == 201
        await client.wait_for_seq(r.body["seq"], timeout=10)
        assert client.messages[-1]["text"] == "through the stand-in"
    finally:
        await client.close()


# -- item 2: a bare machine (no nginx) gets working demo pages ---------------------------------


def test_without_nginx_the_banner_says_what_serves_nginx_port(bare: Stack) -> None:
    output = bare.run_output()
    assert f"proxy    {bare.nginx}" in output
    assert "nginx does not run (--no-nginx)" in output
    assert f"{bare.nginx}/demo/widget.html?assistant_id={demo_tenant(bare)['assistant_id']}" \
        in output
    assert "proxy" in bare.ctl("status") and "RUNNING" in bare.ctl("status")


@pytest.mark.gen_test(timeout=60)
async def test_the_stand_in_routes_api_sockets_and_pages(bare: Stack) -> None:
    tenant: Tenant = create_tenant(bare.env["DATABASE_URL"], [bare.nginx])
    api = Api(bare.nginx)
    sockets = Sockets(bare.nginx.replace("http://", "ws://"))
    dialog_id, guest = await api.widget_dialog(tenant, origin=bare.nginx)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    widget = await sockets.open(sockets.widget_url(tenant, dialog_id, guest), origin=bare.nginx)
    sent = [await api.post_widget(dialog_id, guest, "through the stand-in"),
            await api.post_operator(tenant, dialog_id, "answered")]
    for client in (admin, widget):
        await client.wait_for_seq(2)
        assert client.messages == sent
    # The gateway's close codes pass through unchanged.
    assert await sockets.refused(sockets.widget_url(tenant, dialog_id, guest),
                                 origin="https://evil.example") == 4003
    assert await sockets.refused(sockets.admin_url(tenant, 999_999_999)) == 4004
    await sockets.close_all()
    for path in ("/demo/widget.html", "/demo/admin.html", "/demo/replyx.js"):
        r = await api.request("GET", path)
        assert r.code == 200, path
    assert (await api.request("GET", "/health")).body["status"] == "ok"
    assert (await api.request("GET", "/metrics")).code == 404  # not exposed, as with nginx


def test_demo_pages_work_in_chromium_without_nginx(bare: Stack) -> None:
    """The widget and the operator panel, as the banner prints them, on a machine without nginx."""
    from playwright.sync_api import expect, sync_playwright

    tenant = demo_tenant(bare)
    timeout = 30_000
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            widget, admin = context.new_page(), context.new_page()
            widget.goto(f"{bare.nginx}/demo/widget.html?assistant_id={tenant['assistant_id']}")
            expect(widget.locator("#status")).to_have_text("live", timeout=timeout)
            dialog_id = widget.locator("#dialog").get_attribute("data-dialog")
            admin.goto(f"{bare.nginx}/demo/admin.html#dialog={dialog_id}")
            admin.fill("#email", tenant["email"])
            admin.fill("#password", tenant["password"])
            admin.click("#login-button")
            expect(admin.locator("#status")).to_have_text("live", timeout=timeout)
            # The header says who is logged in.
            expect(admin.locator("#who")).to_contain_text(tenant["email"], timeout=timeout)
            widget.fill("#text", "hello from the widget")
            widget.press("#text", "Enter")
            for page in (widget, admin):
                expect(page.locator("#messages li .text")).to_have_text(
                    ["hello from the widget"], timeout=timeout)
        finally:
            browser.close()


# -- item 5: `replyx psql` passes its arguments on -----------------------------------------------


def test_psql_gets_its_arguments_as_given(bare: Stack) -> None:
    env = bare_env(REPLYX_DATA_DIR=str(bare.data_dir))
    result = replyx("psql", "-XAtc", "select 40 + 2", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    result = replyx("psql", "--", "-XAt", "-c", "select 'after --'", env=env)
    assert result.stdout.strip() == "after --", result.stderr


# -- items 6 and 8: no stack here, said plainly; nothing created -----------------------------


def test_commands_without_a_stack_say_so_and_create_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "var"
    env = bare_env(REPLYX_DATA_DIR=str(empty))
    for args in (["create-user", "a@b.example", "--password", "long enough"],
                 ["create-assistant", "--user-id", "1", "--name", "X"],
                 ["token", "--user-id", "1"], ["dsn"], ["psql", "-c", "select 1"],
                 ["stop-db"]):
        result = replyx(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "no ReplyX stack found" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    result = replyx("ctl", "status", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "no stack is running" in result.stderr and "Traceback" not in result.stderr
    assert not (empty / "pg").exists() and not (empty / "jwt_secret").exists()
    # `migrate` may create one: it is how a database is made without running the stack.
    assert "migrate" in subprocess.run([str(BIN / "replyx"), "--help"], capture_output=True,
                                       text=True, check=False).stdout


def test_the_default_data_dir_falls_back_to_the_checkouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # outside the checkout
    default = Settings.from_environ({})
    assert state.candidates(default) == [tmp_path / "var", state.CHECKOUT / "var"]
    explicit = Settings.from_environ({"REPLYX_DATA_DIR": str(tmp_path)})
    assert state.candidates(explicit) == [tmp_path]
    assert state.find_data_dir(explicit) is None
    (tmp_path / "jwt_secret").write_text("x")
    assert state.find_data_dir(explicit) == tmp_path


def test_ctl_finds_the_stack_from_its_data_dir_alone(bare: Stack) -> None:
    result = replyx("ctl", "status", env=bare_env(REPLYX_DATA_DIR=str(bare.data_dir)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"gateway\s+RUNNING", result.stdout)


def test_token_from_the_data_dir_alone_opens_a_socket_of_the_stack(bare: Stack) -> None:
    tenant = demo_tenant(bare)
    env = bare_env(REPLYX_DATA_DIR=str(bare.data_dir), REPLYX_JWT_SECRET=TEST_JWT_SECRET)
    result = replyx("token", "--user-id", str(tenant["user_id"]), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2  # a JWT, from the database the state file names


# -- item 8: the sync endpoint on a dialog that does not exist --------------------------------


@pytest.mark.gen_test
async def test_sync_of_a_dialog_that_does_not_exist_is_404(gateway: Gateway) -> None:
    response = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{gateway.port}/api/debug/websocket/sync?dialog_id=123456789",
        raise_error=False,
    )
    assert response.code == 404, response.body
