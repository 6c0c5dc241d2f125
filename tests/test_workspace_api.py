"""The workspace over HTTP: teams decide who is an operator, read receipts, the dialog list.

Real backend (in-process) on real Postgres; the team is changed the way an
operator would, with ``replyx add-operator`` / ``remove-operator``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fix_apps import Api
from tests.fix_db import Tenant

BIN = Path(sys.executable).parent


def replyx(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run([str(BIN / "replyx"), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def team(database_url: str, verb: str, tenant: Tenant, user_id: int) -> dict[str, Any]:
    result = replyx(database_url, verb, "--assistant-id", str(tenant.assistant_id),
                    "--user-id", str(user_id))
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


@pytest.mark.gen_test(timeout=60)
async def test_a_member_is_an_operator_until_removed(
    api: Api, tenant: Tenant, make_tenant: Any, database_url: str
) -> None:
    member = make_tenant()
    dialog_id = await api.site_dialog(tenant)
    path = f"/api/dialogs/{dialog_id}/messages"
    assert (await api.request("GET", path, token=member.token)).code == 404

    assert team(database_url, "add-operator", tenant, member.user_id)["added"] is True
    assert team(database_url, "add-operator", tenant, member.user_id)["added"] is False
    assert (await api.request("POST", path, {"text": "hi"}, token=member.token)).code == 201
    r = await api.request("GET", "/api/dialogs", token=member.token)
    assert [d["dialog_id"] for d in r.body["dialogs"]] == [dialog_id]

    assert team(database_url, "remove-operator", tenant, member.user_id)["removed"] is True
    assert (await api.request("GET", path, token=member.token)).code == 404
    r = await api.request("GET", "/api/dialogs", token=member.token)
    assert r.body == {"dialogs": [], "total": 0, "next_before": None}
    # The owner stays on the team, whatever is asked.
    result = replyx(database_url, "remove-operator", "--assistant-id", str(tenant.assistant_id),
                    "--user-id", str(tenant.user_id))
    assert result.returncode == 1 and "owner cannot be removed" in result.stderr
    assert (await api.request("GET", path, token=tenant.token)).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_read_receipts_move_forward_only_and_never_past_the_end(
    api: Api, tenant: Tenant, make_tenant: Any
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    for i in range(3):
        await api.post_widget(dialog_id, guest, f"v{i}")
    await api.post_operator(tenant, dialog_id, "answer")
    op = f"/api/dialogs/{dialog_id}/read"
    visitor = f"/api/widget/dialogs/{dialog_id}/read"
    origin = {"Origin": tenant.domains[0]}

    r = await api.request("POST", op, {"seq": 2}, token=tenant.token)
    assert (r.code, r.body) == (200, {"dialog_id": dialog_id, "side": "operator", "seq": 2})
    r = await api.request("POST", op, {"seq": 1}, token=tenant.token)
    assert (r.code, r.body["seq"]) == (200, 2)  # a lower seq is a no-op
    r = await api.request("POST", op, {"seq": 5}, token=tenant.token)
    assert r.code == 400 and "past" in r.body["error"]
    r = await api.request("POST", visitor, {"seq": 4}, token=guest, headers=origin)
    assert (r.code, r.body) == (200, {"dialog_id": dialog_id, "side": "visitor", "seq": 4})
    for bad in ({"seq": -1}, {"seq": "3"}, {"seq": True}, {}, {"seq": 2**63}):
        r = await api.request("POST", op, bad, token=tenant.token)
        assert r.code == 400, bad

    r = await api.request("GET", "/api/dialogs", token=tenant.token)
    (entry,) = r.body["dialogs"]
    assert entry["operator_read_seq"] == 2 and entry["visitor_read_seq"] == 4
    assert entry["unread"] == 1  # v2; the operator's own answer never counts
    assert entry["last_message"]["text"] == "answer"

    # Someone else's dialog looks like none at all, to both sides.
    stranger = make_tenant()
    r = await api.request("POST", op, {"seq": 1}, token=stranger.token)
    assert r.code == 404
    _, other_guest = await api.widget_dialog(tenant)
    r = await api.request("POST", visitor, {"seq": 1}, token=other_guest, headers=origin)
    assert r.code == 404


@pytest.mark.gen_test(timeout=60)
async def test_the_dialog_list_pages_by_activity_newest_first(
    api: Api, tenant: Tenant
) -> None:
    dialogs = [await api.site_dialog(tenant) for _ in range(5)]
    await api.post_site(tenant, dialogs[1], "bump")  # dialog 1 is now the most recent
    expected = [dialogs[1], dialogs[4], dialogs[3], dialogs[2], dialogs[0]]
    seen: list[int] = []
    before = ""
    while True:
        r = await api.request("GET", f"/api/dialogs?limit=2{before}", token=tenant.token)
        assert r.code == 200 and r.body["total"] == 5
        seen += [d["dialog_id"] for d in r.body["dialogs"]]
        if r.body["next_before"] is None:
            break
        before = f"&before={r.body['next_before']}"
    assert seen == expected
    r = await api.request("GET", "/api/dialogs?limit=0", token=tenant.token)
    assert r.code == 400
