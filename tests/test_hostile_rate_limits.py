"""Limits where anyone can call (issue 16, item 5): widget dialog creation and the widget and
site message and typing POSTs are counted per client address and per guest token, in Postgres,
so every backend worker shares them; the widget's writes obey its origin rule; CORS answers
only origins the widget may run on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from tornado.ioloop import IOLoop

from tests.fix_apps import Api, Response, start_backend
from tests.fix_db import Tenant, make_settings

SHOP = "https://shop.example"


def fresh_address() -> str:
    """A client address of its own (X-Real-IP, believed from the loopback test client)."""
    return f"198.19.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


@pytest.fixture
def two_workers(io_loop: IOLoop, tmp_path: Path, database_url: str) -> Iterator[tuple[Api, Api]]:
    """Two backend apps on one database with small limits: two gunicorn workers, in small."""
    limited = make_settings(
        tmp_path / "var",
        REPLYX_WIDGET_DIALOG_RATE="0.01", REPLYX_WIDGET_DIALOG_BURST="3",
        REPLYX_ADDRESS_WRITE_RATE="0.01", REPLYX_ADDRESS_WRITE_BURST="8",
        REPLYX_GUEST_WRITE_RATE="0.01", REPLYX_GUEST_WRITE_BURST="4",
    )
    first, stop_first = start_backend(io_loop, limited, database_url)
    second, stop_second = start_backend(io_loop, limited, database_url)
    yield Api(first), Api(second)
    stop_first()
    stop_second()


def assert_limited(r: Response) -> int:
    assert r.code == 429, (r.code, r.body)
    assert isinstance(r.body, dict) and set(r.body) == {"error"}, r.body
    wait = int(r.headers["Retry-After"])
    assert 1 <= wait <= 1000
    assert r.body["error"] == f"too many requests; retry in {wait} s"
    return wait


async def new_widget_dialog(api: Api, tenant: Tenant, address: str) -> Response:
    return await api.request("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
                             headers={"Origin": SHOP, "X-Real-IP": address})


@pytest.mark.gen_test(timeout=60)
async def test_widget_dialogs_are_limited_per_address_across_workers(
    two_workers: tuple[Api, Api], tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    one, two = two_workers
    address = fresh_address()
    for api in (one, two, one):
        assert (await new_widget_dialog(api, tenant, address)).code == 201
    assert_limited(await new_widget_dialog(two, tenant, address))
    assert_limited(await new_widget_dialog(one, tenant, address))
    # Another address is not affected; neither is a caller on this host (no proxy header).
    assert (await new_widget_dialog(one, tenant, fresh_address())).code == 201
    r = await one.request("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
                          headers={"Origin": SHOP})
    assert r.code == 201
    # The bucket refills with time (moved back here rather than waited for).
    sql.execute("UPDATE rate_limits SET updated_at = now() - interval '1 hour'"
                " WHERE key = %s", (f"widget-dialog:{address}",))
    assert (await new_widget_dialog(two, tenant, address)).code == 201


@pytest.mark.gen_test(timeout=60)
async def test_a_burst_of_dialogs_on_every_worker_gets_exactly_the_burst(
    two_workers: tuple[Api, Api], tenant: Tenant
) -> None:
    one, two = two_workers
    address = fresh_address()
    results = await asyncio.gather(
        *(new_widget_dialog((one, two)[i % 2], tenant, address) for i in range(10)))
    assert sorted(r.code for r in results) == [201] * 3 + [429] * 7


@pytest.mark.gen_test(timeout=60)
async def test_guest_writes_are_limited_per_guest_token_whatever_the_address(
    two_workers: tuple[Api, Api], tenant: Tenant
) -> None:
    one, two = two_workers
    created = await new_widget_dialog(one, tenant, fresh_address())
    dialog_id, guest = created.body["dialog_id"], created.body["guest_token"]
    path = f"/api/widget/dialogs/{dialog_id}"
    # Messages and typing events share the guest's bucket; each request from a new address.
    for i, api in enumerate((one, two, one, two)):
        if i % 2:
            r = await api.request("POST", path + "/typing", token=guest,
                                  headers={"X-Real-IP": fresh_address()})
            assert r.code == 204, r.body
        else:
            r = await api.request("POST", path + "/messages", {"text": f"hi {i}"}, token=guest,
                                  headers={"X-Real-IP": fresh_address()})
            assert r.code == 201, r.body
    assert_limited(await two.request("POST", path + "/messages", {"text": "one more"},
                                     token=guest, headers={"X-Real-IP": fresh_address()}))
    # Even a caller on this host (not counted per address) is counted per guest token.
    assert_limited(await one.request("POST", path + "/typing", token=guest))
    # Another guest of the same assistant has a bucket of its own.
    other = await new_widget_dialog(two, tenant, fresh_address())
    r = await one.request("POST", f"/api/widget/dialogs/{other.body['dialog_id']}/messages",
                          {"text": "me too"}, token=other.body["guest_token"])
    assert r.code == 201


@pytest.mark.gen_test(timeout=60)
async def test_refused_origins_count_too_so_their_log_lines_are_limited(
    two_workers: tuple[Api, Api], tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = two_workers
    created = await new_widget_dialog(one, tenant, fresh_address())
    path = f"/api/widget/dialogs/{created.body['dialog_id']}/messages"
    address = fresh_address()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backend.widget"):
        # A foreign origin, and one that is no origin at all (refused before any query).
        codes = [(await api.request("POST", path, {"text": "x"},
                                    token=created.body["guest_token"],
                                    headers={"Origin": origin, "X-Real-IP": address})).code
                 for api, origin in zip((one, two, one, two, one, two),
                                        ["https://evil.example", "null"] * 3, strict=True)]
    assert codes == [403] * 4 + [429] * 2
    refusals = [r for r in caplog.records if "WEBSOCKET_4003_ERROR" in r.getMessage()]
    assert len(refusals) == 4


@pytest.mark.gen_test(timeout=60)
async def test_widget_and_site_writes_are_limited_per_address(
    two_workers: tuple[Api, Api], tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    one, two = two_workers
    address = fresh_address()
    site_dialog = (await one.request(
        "POST", f"/api/site/dialogs?site_token={quote(tenant.site_token)}")).body["dialog_id"]
    site = f"/api/site/dialogs/{site_dialog}"
    query = f"?site_token={quote(tenant.site_token)}"
    # Guests from one address: each has tokens left, the address runs out (burst 8).
    codes = []
    for _ in range(3):
        created = await new_widget_dialog(one, tenant, fresh_address())
        dialog_id, guest = created.body["dialog_id"], created.body["guest_token"]
        for api in (one, two):
            r = await api.request("POST", f"/api/widget/dialogs/{dialog_id}/messages",
                                  {"text": "x"}, token=guest, headers={"X-Real-IP": address})
            codes.append(r.code)
    for path, body in ((site + "/messages" + query, {"text": "x"}), (site + "/typing" + query,
                                                                     None)):
        r = await two.request("POST", path, body, headers={"X-Real-IP": address})
        codes.append(r.code)
    assert codes == [201] * 6 + [201, 204]
    assert_limited(await one.request("POST", site + "/messages" + query, {"text": "x"},
                                     headers={"X-Real-IP": address}))
    assert_limited(await two.request("POST", site + "/typing" + query,
                                     headers={"X-Real-IP": address}))
    # The refused requests were not written.
    count = sql.execute("SELECT count(*) FROM messages WHERE dialog_id = %s",
                        (site_dialog,)).fetchone()
    assert count == (1,)
    # A site integration on this host is not counted per address.
    for _ in range(10):
        r = await one.request("POST", site + "/messages" + query, {"text": "local"})
        assert r.code == 201


@pytest.mark.gen_test(timeout=60)
async def test_idle_buckets_are_forgotten(
    two_workers: tuple[Api, Api], tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    one, _ = two_workers
    stale = f"widget-dialog:{fresh_address()}"
    sql.execute("INSERT INTO rate_limits (key, tokens, rate, burst, updated_at)"
                " VALUES (%s, 0, 1, 1, now() - interval '30 days')", (stale,))
    assert (await new_widget_dialog(one, tenant, fresh_address())).code == 201
    assert sql.execute("SELECT count(*) FROM rate_limits WHERE key = %s",
                       (stale,)).fetchone() == (0,)


# -- the widget's origin rule on every write ---------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_widget_writes_check_the_page_origin(
    api: Api, tenant: Tenant, sql: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    path = f"/api/widget/dialogs/{dialog_id}"
    for origin in ("https://evil.example", "https://shop.example.evil.com", "null",
                   "http://shop.example", "https://" + "a" * 7800 + ".example"):
        with caplog.at_level(logging.WARNING, logger="backend.widget"):
            caplog.clear()
            r = await api.request("POST", path + "/messages", {"text": "from evil"}, token=guest,
                                  headers={"Origin": origin})
            assert r.code == 403 and r.body == {"error": "origin not allowed for this assistant"}
            assert "Access-Control-Allow-Origin" not in r.headers
            r = await api.request("POST", path + "/typing", token=guest,
                                  headers={"Origin": origin})
            assert r.code == 403, origin
            lines = [rec.getMessage() for rec in caplog.records]
            refusals = [line for line in lines if "WEBSOCKET_4003_ERROR" in line]
            assert len(refusals) == 2, lines
            # A long Origin is clipped in the log line, never written whole.
            assert all(len(line) < 400 for line in lines), lines
    assert sql.execute("SELECT count(*) FROM messages WHERE dialog_id = %s",
                       (dialog_id,)).fetchone() == (0,)
    # The allowed page may write, and may read the answer.
    r = await api.request("POST", path + "/messages", {"text": "from the shop"}, token=guest,
                          headers={"Origin": SHOP})
    assert r.code == 201 and r.headers["Access-Control-Allow-Origin"] == SHOP
    r = await api.request("POST", path + "/typing", token=guest, headers={"Origin": SHOP})
    assert r.code == 204 and r.headers["Access-Control-Allow-Origin"] == SHOP
    # A wrong guest token from the allowed page is still 401; a wrong dialog is 404.
    r = await api.request("POST", path + "/messages", {"text": "x"}, token="rxg_" + "x" * 43,
                          headers={"Origin": SHOP})
    assert r.code == 401 and "Access-Control-Allow-Origin" not in r.headers
    other, _ = await api.widget_dialog(tenant)
    r = await api.request("POST", f"/api/widget/dialogs/{other}/messages", {"text": "x"},
                          token=guest, headers={"Origin": SHOP})
    assert r.code == 404


WIDGET_HOST = "https://widget.replyx.example"


@pytest.fixture
def iframe_api(io_loop: IOLoop, tmp_path: Path, database_url: str) -> Iterator[Api]:
    """A backend that knows the widget host (REPLYX_WIDGET_ORIGIN)."""
    settings = make_settings(tmp_path / "iframe", REPLYX_WIDGET_ORIGIN=WIDGET_HOST)
    base, stop = start_backend(io_loop, settings, database_url)
    yield Api(base)
    stop()


@pytest.mark.gen_test(timeout=60)
async def test_widget_writes_from_our_iframe_check_the_parent_origin(
    iframe_api: Api, tenant: Tenant
) -> None:
    api = iframe_api
    created = await api.request(
        "POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id,
                                        "parent_origin": SHOP},
        headers={"Origin": WIDGET_HOST})
    assert created.code == 201
    dialog_id, guest = created.body["dialog_id"], created.body["guest_token"]
    path = f"/api/widget/dialogs/{dialog_id}"
    head = {"Origin": WIDGET_HOST}
    r = await api.request("POST", path + "/messages", {"text": "x", "parent_origin": SHOP},
                          token=guest, headers=head)
    assert r.code == 201
    r = await api.request("POST", f"{path}/typing?parent_origin={quote(SHOP)}",
                          token=guest, headers=head)
    assert r.code == 204
    for bad in (None, "https://evil.example"):
        body: dict[str, Any] = {"text": "x"} if bad is None else {"text": "x",
                                                                  "parent_origin": bad}
        r = await api.request("POST", path + "/messages", body, token=guest, headers=head)
        assert r.code == 403, bad


@pytest.mark.gen_test(timeout=60)
async def test_cors_answers_only_origins_the_widget_may_run_on(
    api: Api, tenant: Tenant
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    preflight = {"Access-Control-Request-Method": "POST"}
    paths = ["/api/widget/dialogs", f"/api/widget/dialogs/{dialog_id}/messages",
             f"/api/widget/dialogs/{dialog_id}/typing"]
    for path in paths:
        r = await api.request("OPTIONS", path, headers={**preflight, "Origin": SHOP})
        assert r.code == 204 and r.headers["Access-Control-Allow-Origin"] == SHOP, path
        for origin in ("https://evil.example", "null", "https://shop.example.evil.com"):
            r = await api.request("OPTIONS", path, headers={**preflight, "Origin": origin})
            assert "Access-Control-Allow-Origin" not in r.headers, (path, origin)
    # Refused POSTs from other origins get no CORS headers either: the page cannot read them.
    r = await api.request("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
                          headers={"Origin": "https://evil.example"})
    assert r.code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await api.request("POST", f"/api/widget/dialogs/{dialog_id}/messages", {"text": "x"},
                          token=guest, headers={"Origin": "https://evil.example"})
    assert r.code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await api.request("POST", "/api/widget/dialogs", {"assistant_id": tenant.assistant_id},
                          headers={"Origin": SHOP})
    assert r.code == 201 and r.headers["Access-Control-Allow-Origin"] == SHOP
