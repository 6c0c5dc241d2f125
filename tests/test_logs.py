"""Logs of the shared production-like stack (``ops`` in tests/fix_stack.py): one grep-able
line per event under the data dir, no token in any of them, rotation at the configured size."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from replyx.logs import FORMAT, HeldLines, LineFormatter
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.fix_stack import LOG_BACKUPS, LOG_MAX_BYTES, Stack
from tests.net import get_text


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
    code, _ = await get_text(f"{ops.gateway}/api/debug/websocket/sync?dialog_id=x"
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
            while not re.search(pattern, ops.logs(name)):
                assert time.monotonic() < deadline, (name, pattern, ops.logs(name)[-3000:])
                await asyncio.sleep(0.2)
    # Grep as the seed's runbook does: one line per event, with dialog id and close code.
    refused = [line for line in ops.logs("gateway").splitlines()
               if "WEBSOCKET_4003_ERROR" in line and f"dialog_id={dialog_id}" in line]
    assert len(refused) == 1 and "code=4003" in refused[0]
    # The broadcast lines are written in batches (replyx.logs.HeldLines), yet each is a
    # whole line of its own with the usual prefix.
    broadcast = [line for line in ops.logs("gateway").splitlines()
                 if f"Broadcasting message dialog_id={dialog_id} " in line]
    assert len(broadcast) == 1
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO \[(?:gateway\S* )?\d+\] "
                    r"ws_gateway\.router: Broadcasting message ", broadcast[0]), broadcast[0]

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


def test_held_lines_are_written_at_once_each_with_its_prefix() -> None:
    """The hot path's lines wait for flush(), then leave in one write, one line each."""
    stream = io.StringIO()
    writes: list[str] = []
    original = stream.write

    def counting(text: str) -> int:
        writes.append(text)
        return original(text)

    stream.write = counting  # type: ignore[method-assign]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(FORMAT))
    logger = logging.getLogger("test.held")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    held = HeldLines(logger)
    for seq in (1, 2, 3):
        held.add("Broadcasting message dialog_id=%d seq=%d sockets=%d", 7, seq, 2)
    assert stream.getvalue() == ""  # nothing before the flush
    held.flush()
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"Broadcasting message dialog_id=7 seq={seq} sockets=2" for seq in (1, 2, 3)]
    assert all(re.match(r"\d{4}-\d\d-\d\d \S+ INFO \[\d+\] test\.held: ", line)
               for line in lines), lines
    assert len([w for w in writes if "Broadcasting" in w]) == 1
    held.flush()  # nothing held: nothing written
    assert len(stream.getvalue().splitlines()) == 3
    # Above the level: not even held.
    logger.setLevel(logging.WARNING)
    held.add("Broadcasting message dialog_id=%d seq=%d sockets=%d", 7, 4, 2)
    assert held.lines == []
