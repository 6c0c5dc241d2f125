"""The backend's pool after the server ended its sessions (a Postgres restart, an admin's
``pg_terminate_backend``): not one request fails for it.

The pool checks a connection at checkout without a round trip (backend/db.py): an
idle session's socket turns readable only when the server ends it.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from replyx.protocol import BACKEND_APPLICATION
from tests.fix_apps import Api
from tests.fix_db import Tenant

END_SESSIONS = """
    SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
     WHERE application_name = %s AND datname = current_database() AND pid <> pg_backend_pid()
"""


@pytest.mark.gen_test(timeout=60)
async def test_posts_succeed_after_the_server_ended_every_idle_session(
    api: Api, tenant: Tenant, database_url: str
) -> None:
    dialog_id = await api.site_dialog(tenant)
    # Several pooled connections, all idle afterwards.
    await asyncio.gather(*(api.post_site(tenant, dialog_id, f"warm {n}") for n in range(8)))
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(END_SESSIONS, (BACKEND_APPLICATION,)).fetchone()
    assert row is not None and row[0] >= 2
    await asyncio.sleep(0.5)  # the server's goodbye reaches the pooled sockets
    # One after another, then all at once: post_site asserts 201 every time (a dead
    # connection used as it is would answer 503).
    for n in range(4):
        await api.post_site(tenant, dialog_id, f"after {n}")
    await asyncio.gather(*(api.post_site(tenant, dialog_id, f"burst {n}") for n in range(8)))
    r = await api.request("GET", f"/api/dialogs/{dialog_id}/messages", token=tenant.token)
    assert r.code == 200
    assert [m["seq"] for m in r.body["messages"]] == list(range(1, 21))
