"""Hostile HTTP calls to the backend API: whatever arrives, the answer is a success or a 4xx
with ``{"error": …}`` and no stack trace, never a 500; SQL-looking text is data; failed
logins are limited per client address across every worker.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.ioloop import IOLoop

from replyx import security
from tests.fix_apps import Api, Response, Sockets, start_backend
from tests.fix_db import TEST_JWT_SECRET, Tenant, make_settings
from tests.fix_secrets import remember

MAX_BODY = 1024 * 1024
MAX_TEXT = 32 * 1024
EXPECTED_CODES = {200, 201, 204, 400, 401, 403, 404, 405, 413, 429}


def assert_error(r: Response, code: int | tuple[int, ...], what: object) -> None:
    codes = code if isinstance(code, tuple) else (code,)
    assert r.code in codes, (what, r.code, r.body)
    assert isinstance(r.body, dict) and set(r.body) == {"error"}, (what, r.body)
    assert isinstance(r.body["error"], str) and "Traceback" not in r.body["error"], what
    assert r.headers["Content-Type"].startswith("application/json"), what


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()  # orjson would refuse integers beyond 64 bits


def fresh_address() -> str:
    """A client address of its own (X-Real-IP, believed from the loopback test client)."""
    return f"198.18.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


# -- malformed input, endpoint by endpoint ----------------------------------------------------

BAD_JSON = [b"{", b"{not json", b"[1, 2]", b"null", b"1", b'"text"', b"\xff\xfe{}",
            b'{"text": "\\ud800"}', b'{"text": NaN}', b"[" * 2000 + b"]" * 2000,
            b'{"text": "a"} trailing']
BAD_TEXT = [{}, {"text": None}, {"text": 5}, {"text": 1.5}, {"text": True}, {"text": []},
            {"text": {"a": 1}}, {"text": ""}, {"text": " \n\t "}, {"text": "a\u0000b"},
            {"txt": "typo"}, {"text": 7, "extra": "x"}]


@pytest.mark.gen_test(timeout=90)
async def test_malformed_bodies_get_400_json_on_every_write_endpoint(
    api: Api, tenant: Tenant
) -> None:
    widget_dialog, guest = await api.widget_dialog(tenant)
    site = quote(tenant.site_token)
    writers = [
        (f"/api/dialogs/{widget_dialog}/messages", tenant.token),
        (f"/api/site/dialogs/{widget_dialog}/messages?site_token={site}", None),
        (f"/api/widget/dialogs/{widget_dialog}/messages", guest),
    ]
    for path, token in writers:
        for raw in [b"", *BAD_JSON]:
            assert_error(await api.request("POST", path, raw=raw, token=token), 400, (path, raw))
        for body in BAD_TEXT:
            assert_error(await api.request("POST", path, body, token=token), 400, (path, body))
        too_long = await api.request("POST", path, {"text": "я" * (MAX_TEXT + 1)}, token=token)
        assert_error(too_long, 413, path)
        exact = await api.request("POST", path, {"text": "я" * MAX_TEXT}, token=token)
        assert exact.code == 201 and len(exact.body["text"]) == MAX_TEXT
    r = await api.request("POST", writers[1][0], {"text": "x", "sender": "operator"})
    assert_error(r, 400, "a site may not speak as the operator")
    for sender in (5, None, ["visitor"], "VISITOR", "visitor "):
        r = await api.request("POST", writers[1][0], {"text": "x", "sender": sender})
        assert r.code in (201, 400), sender
        if r.code == 201:
            assert sender is None  # absent means visitor
    for body in ({}, {"assistant_id": None}, {"assistant_id": "1"}, {"assistant_id": 1.0},
                 {"assistant_id": -1}, {"assistant_id": 0}, {"assistant_id": 2**63},
                 {"assistant_id": [1]}, {"assistant_id": tenant.assistant_id, "parent_origin": 5}):
        r = await api.request("POST", "/api/widget/dialogs", body,
                              headers={"Origin": "https://shop.example"})
        assert_error(r, 400, body)
    for body in ({}, {"email": "a@b.c"}, {"password": "x"}, {"email": 1, "password": "x"},
                 {"email": "a@b.c", "password": None}, {"email": "a" * 400, "password": "x"},
                 {"email": "a@b.c", "password": "x" * 2000}):
        r = await api.request("POST", "/api/auth/login", body,
                              headers={"X-Real-IP": fresh_address()})
        assert_error(r, 400, body)


async def raw_post(base: str, path: str, token: str, length: str,
                   body: bytes) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    size = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:"))
    payload = await asyncio.wait_for(reader.readexactly(size), 10)
    writer.close()
    return status, payload


@pytest.mark.gen_test(timeout=60)
async def test_oversize_bodies_are_refused_with_413_json(api: Api, tenant: Tenant) -> None:
    dialog_id = await api.site_dialog(tenant)
    path = f"/api/dialogs/{dialog_id}/messages"
    big = b'{"text": "' + b"x" * MAX_BODY + b'"}'
    assert_error(await api.request("POST", path, raw=big, token=tenant.token), 413, "length")
    # Lying or absurd Content-Length headers, written by hand (an HTTP client would fix them).
    for length, code in (("99999999999999999999", 413), ("abc", 400), ("-1", 400)):
        status, body = await raw_post(api.base, path, tenant.token, length, b"{}")
        assert status == code, length
        assert set(orjson.loads(body)) == {"error"}, length

    # Chunked: no Content-Length to refuse up front; the body is cut off at the limit.
    async def produce(write: Callable[[bytes], Any]) -> None:
        await write(b'{"text": "')
        for _ in range(20):
            await write(b"x" * 65536)
        await write(b'"}')

    response = await AsyncHTTPClient().fetch(HTTPRequest(
        api.base + path, method="POST", body_producer=produce, request_timeout=30,
        headers={"Authorization": f"Bearer {tenant.token}"}), raise_error=False)
    # Tornado stops reading at the limit and answers a bare 400 (no JSON: it is the HTTP layer
    # refusing, before any handler runs), then hangs up. Behind nginx the same body gets 413.
    assert response.code == 400, response.code
    # And the API still answers.
    assert (await api.request("GET", path, token=tenant.token)).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_bad_ids_and_queries_get_404_or_400_json(api: Api, tenant: Tenant) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    bad_ids = ["abc", "0", "-1", "1.5", "1e3", "0x10", " 1", "1 ", "١٢", "²", "9" * 19,
               str(2**63), "9" * 40, "%00", "1;DROP TABLE dialogs", "' OR '1'='1", "..", "%2e%2e",
               "99999999999"]
    routes = [
        ("GET", "/api/dialogs/{}/messages", tenant.token),
        ("POST", "/api/dialogs/{}/messages", tenant.token),
        ("POST", "/api/dialogs/{}/typing", tenant.token),
        ("POST", "/api/site/dialogs/{}/messages", tenant.site_token),
        ("POST", "/api/site/dialogs/{}/typing", tenant.site_token),
        ("POST", "/api/widget/dialogs/{}/messages", guest),
        ("POST", "/api/widget/dialogs/{}/typing", guest),
    ]
    for method, template, token in routes:
        for raw_id in bad_ids:
            path = template.format(quote(raw_id, safe="%"))
            body = {"text": "x"} if method == "POST" else None
            r = await api.request(method, path, body, token=token)
            assert_error(r, (400, 404), (method, path))
    messages = f"/api/dialogs/{dialog_id}/messages"
    for query in ("since=abc", "since=-5", "since=1.0", "since=" + "9" * 30, "since=%FF",
                  "limit=0", "limit=1001", "limit=x", "since=1;DROP"):
        assert_error(await api.request("GET", f"{messages}?{query}", token=tenant.token), 400,
                     query)
    for method in ("PUT", "DELETE", "PATCH"):
        r = await api.request(method, messages, raw=b"{}" if method != "DELETE" else None,
                              token=tenant.token)
        assert_error(r, 405, method)
    for path in ("/api", "/api/", "/api/dialogs/1/messages/2", "/api/../etc/passwd", "/x" * 500):
        assert_error(await api.request("GET", path), 404, path)
    for header in ("Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer x y z", "Token abc",
                   "Bearer " + "x" * 5000, "Bearer ' OR 1=1 --"):
        r = await api.request("GET", messages, headers={"Authorization": header})
        assert_error(r, 401, header)


@pytest.mark.gen_test(timeout=60)
async def test_sql_looking_text_is_data_everywhere(
    api: Api, sockets: Sockets, tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    dialog_id, guest = await api.widget_dialog(tenant)
    admin = await sockets.open(sockets.admin_url(tenant, dialog_id))
    texts = [
        "'); DROP TABLE messages; --",
        "Robert'); DROP TABLE students;--",
        "' OR '1'='1",
        "1; SELECT pg_sleep(10)",
        "$1 $2 %s %(text)s :text ? {}",
        "\\'; \\\\ \\x00 E'\\n'",
        "$$; DROP FUNCTION replyx_message_json(messages); $$",
        "'); NOTIFY replyx_events, 'x'; --",
        "<script>alert(1)</script>",
        "\"}], \"type\": \"ready\"",
        "emoji 🎉 and RTL ‮ text",
    ]
    posted = []
    for i, text in enumerate(texts):
        if i % 3 == 0:
            posted.append(await api.post_operator(tenant, dialog_id, text))
        elif i % 3 == 1:
            posted.append(await api.post_site(tenant, dialog_id, text))
        else:
            posted.append(await api.post_widget(dialog_id, guest, text))
    assert [m["text"] for m in posted] == texts
    rows = sql.execute("SELECT text FROM messages WHERE dialog_id = %s ORDER BY seq",
                       (dialog_id,)).fetchall()
    assert [row[0] for row in rows] == texts
    await admin.wait_for_seq(len(texts))
    assert admin.messages == posted
    history = await api.request("GET", f"/api/dialogs/{dialog_id}/messages", token=tenant.token)
    assert history.body["messages"] == posted
    # The tables and the functions are all still there.
    assert sql.execute("SELECT count(*) FROM messages WHERE dialog_id = %s",
                       (dialog_id,)).fetchone() == (len(texts),)
    # SQL in a credential or an email is just a wrong credential.
    r = await api.request("POST", "/api/auth/login", {"email": "' OR 1=1 --", "password": "x"},
                          headers={"X-Real-IP": fresh_address()})
    assert_error(r, 401, "login")
    r = await api.request("POST", f"/api/widget/dialogs/{dialog_id}/messages?guest_token="
                          + quote("' OR '1'='1"), {"text": "x"})
    assert_error(r, 401, "guest")


# -- login failures, limited per address across workers ------------------------------------------


@pytest.fixture
def two_workers(io_loop: IOLoop, tmp_path: Path, database_url: str) -> Iterator[tuple[Api, Api]]:
    """Two backend apps with their own pools on one database: two gunicorn workers, in small."""
    limited = make_settings(tmp_path / "var", REPLYX_LOGIN_MAX_FAILURES="3",
                            REPLYX_LOGIN_WINDOW="600")
    first, stop_first = start_backend(io_loop, limited, database_url)
    second, stop_second = start_backend(io_loop, limited, database_url)
    yield Api(first), Api(second)
    stop_first()
    stop_second()


async def login(api: Api, tenant: Tenant, address: str, *, right: bool) -> Response:
    password = tenant.password if right else "not the password"
    return await api.request("POST", "/api/auth/login",
                             {"email": tenant.email, "password": password},
                             headers={"X-Real-IP": address})


def assert_limited(r: Response) -> int:
    assert_error(r, 429, "limited")
    wait = int(r.headers["Retry-After"])
    assert 1 <= wait <= 600
    assert r.body == {"error": f"too many failed logins from this address; retry in {wait} s"}
    return wait


@pytest.mark.gen_test(timeout=60)
async def test_failed_logins_are_limited_per_address_across_workers(
    two_workers: tuple[Api, Api], tenant: Tenant, sql: psycopg.Connection[Any]
) -> None:
    one, two = two_workers
    address = fresh_address()
    for api in (one, two, one):
        assert_error(await login(api, tenant, address, right=False), 401, "failure")
    assert_limited(await login(two, tenant, address, right=False))
    assert_limited(await login(one, tenant, address, right=True))  # right or wrong: wait
    # Another address is not affected.
    assert (await login(two, tenant, fresh_address(), right=True)).code == 200
    # The window ends (moved back an hour here rather than waited for): welcome again.
    sql.execute("UPDATE login_failures SET window_start = now() - interval '1 hour'"
                " WHERE address = %s", (address,))
    assert (await login(one, tenant, address, right=True)).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_successful_logins_cost_nothing_and_bad_requests_are_not_attempts(
    two_workers: tuple[Api, Api], tenant: Tenant
) -> None:
    one, two = two_workers
    address = fresh_address()
    for i in range(5):
        assert (await login((one, two)[i % 2], tenant, address, right=True)).code == 200
    for _ in range(5):
        r = await one.request("POST", "/api/auth/login", raw=b"{", headers={"X-Real-IP": address})
        assert_error(r, 400, "malformed")
    for api in (two, one, two):
        assert_error(await login(api, tenant, address, right=False), 401, "failure")
    assert_limited(await login(one, tenant, address, right=False))


@pytest.mark.gen_test(timeout=60)
async def test_a_burst_of_guesses_on_every_worker_gets_exactly_the_limit(
    two_workers: tuple[Api, Api], tenant: Tenant
) -> None:
    one, two = two_workers
    address = fresh_address()
    results = await asyncio.gather(
        *(login((one, two)[i % 2], tenant, address, right=False) for i in range(10)))
    codes = sorted(r.code for r in results)
    assert codes == [401] * 3 + [429] * 7


@pytest.mark.gen_test(timeout=60)
async def test_an_ipv6_client_counts_per_slash_64(
    two_workers: tuple[Api, Api], tenant: Tenant
) -> None:
    one, _ = two_workers
    prefix = f"2001:db8:{secrets.randbelow(65536):x}:{secrets.randbelow(65536):x}"
    for host in ("::1", "::2", "::3"):
        assert_error(await login(one, tenant, prefix + host, right=False), 401, host)
    assert_limited(await login(one, tenant, prefix + ":ffff:ffff:ffff:ffff", right=False))
    other = f"2001:db8:{secrets.randbelow(65536):x}:{secrets.randbelow(65536):x}::1"
    assert (await login(one, tenant, other, right=True)).code == 200


# -- property: any request ------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**62),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                           max_leaves=6)
FIELDS = ["text", "sender", "assistant_id", "parent_origin", "email", "password"]
# (path, its method, who it is for); "{}" is a dialog id.
ROUTES = [
    ("/api/auth/login", "POST", "login"),
    ("/api/dialogs", "GET", "operator"),
    ("/api/dialogs/{}/messages", "GET", "operator"),
    ("/api/dialogs/{}/messages", "POST", "operator"),
    ("/api/dialogs/{}/typing", "POST", "operator"),
    ("/api/site/dialogs", "POST", "site"),
    ("/api/site/dialogs/{}/messages", "POST", "site"),
    ("/api/site/dialogs/{}/typing", "POST", "site"),
    ("/api/widget/dialogs", "POST", "origin"),
    ("/api/widget/dialogs/{}/messages", "POST", "guest"),
    ("/api/widget/dialogs/{}/typing", "POST", "guest"),
    ("/health", "GET", "anyone"),
    ("/api/{}", "GET", "anyone"),
]


def test_any_request_gets_success_or_a_4xx_json_and_sockets_keep_receiving(
    io_loop: IOLoop, api: Api, sockets: Sockets, make_tenant: Callable[..., Tenant],
    sql: psycopg.Connection[Any],
) -> None:
    alice = make_tenant(["https://shop.example"])
    bob = make_tenant(["https://bob.example"])
    site_dialog = io_loop.run_sync(lambda: api.site_dialog(alice))
    widget_dialog, guest = io_loop.run_sync(lambda: api.widget_dialog(alice))
    bob_dialog = io_loop.run_sync(lambda: api.site_dialog(bob))
    watchers = [io_loop.run_sync(lambda d=d: sockets.open(sockets.admin_url(alice, d)))
                for d in (site_dialog, widget_dialog)]
    expired = security.issue_operator_token(alice.user_id, TEST_JWT_SECRET.encode(), -10)
    remember(expired, "expired operator JWT")
    address = fresh_address()  # logins here never touch another test's budget

    own = {"login": None, "operator": alice.token, "site": alice.site_token, "origin": None,
           "guest": guest, "anyone": None}
    any_credential = st.sampled_from([None, alice.token, alice.site_token, guest, bob.token,
                                      bob.site_token, expired, "garbage", ""])
    junk_ids = st.integers(min_value=-5, max_value=2**64).map(str) | st.text(max_size=12)
    real_ids = st.sampled_from([site_dialog, widget_dialog, bob_dialog, 9_000_000_000]).map(str)
    near_bodies = st.fixed_dictionaries(
        {}, optional={name: SCALARS | st.just("hello") for name in FIELDS}).map(json_bytes)
    valid_bodies = {
        "login": st.fixed_dictionaries({
            "email": st.sampled_from([alice.email, alice.email.upper(), "nobody@example.com"]),
            "password": st.sampled_from([alice.password, "wrong password"])}),
        "operator": st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}),
        "site": st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}, optional={
            "sender": st.sampled_from(["visitor", "assistant", "system", "operator"])}),
        "guest": st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}),
        "origin": st.fixed_dictionaries({"assistant_id": st.sampled_from(
            [alice.assistant_id, bob.assistant_id, 9_000_000_000])}, optional={
            "parent_origin": st.sampled_from(["https://shop.example", "https://evil.example"])}),
        "anyone": st.none(),
    }
    queries = st.dictionaries(
        st.sampled_from(["since", "limit", "token", "site_token", "guest_token", "x"]),
        st.text(max_size=12) | st.integers(-3, 2000).map(str), max_size=3)

    @st.composite
    def calls(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
        """A request that is right for its route but for zero, one, or any of its parts.

        Fully random requests almost never get past authentication; starting from a valid
        one and breaking a part of it reaches every branch behind it too.
        """
        template, natural, audience = draw(st.sampled_from(ROUTES))
        broken = draw(st.sampled_from(["nothing", "one part", "everything"]))
        part = draw(st.sampled_from(["method", "id", "credential", "body", "origin", "query"]))

        def pick(name: str, right: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> Any:
            if broken == "everything" or (broken == "one part" and part == name):
                return draw(wrong)
            return draw(right)

        method = pick("method", st.just(natural),
                      st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]))
        mine = widget_dialog if audience == "guest" else site_dialog
        raw_id = pick("id", st.sampled_from([mine, widget_dialog]).map(str), real_ids | junk_ids)
        credential = pick("credential", st.just(own[audience]), any_credential)
        body = pick("body", valid_bodies[audience].map(json_bytes), near_bodies
                    | JSON_VALUES.map(json_bytes) | st.binary(max_size=64) | st.none())
        origin = pick("origin", st.just("https://shop.example"), st.sampled_from(
            [None, "https://evil.example", "null", "https://bob.example"]))
        params = dict(pick("query", st.just({}), queries))
        path = template.format(quote(raw_id, safe=""))
        headers = {"X-Real-IP": address}
        if origin:
            headers["Origin"] = origin
        if credential is not None:
            if draw(st.booleans()):
                name = ("site_token" if "/site/" in path else
                        "guest_token" if "/widget/" in path else "token")
                params[name] = credential
            else:
                headers["Authorization"] = f"Bearer {credential}"
        if params:
            path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items())
        if method in ("GET", "DELETE", "OPTIONS"):
            body = None
        elif body is None:
            body = b""
        return method, path, headers, body

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(calls())
    def request(call: tuple[str, str, dict[str, str], bytes | None]) -> None:
        method, path, headers, body = call
        r = io_loop.run_sync(lambda: api.request(method, path, raw=body, headers=headers))
        event(f"HTTP {r.code}")
        assert r.code in EXPECTED_CODES, (method, path, r.code, r.body)
        if r.code >= 400:
            assert isinstance(r.body, dict) and set(r.body) == {"error"}, (path, r.body)
            assert isinstance(r.body["error"], str)

    request()
    # Whatever the API went through, messages still flow to the sockets, in order, once.
    for dialog_id, watcher in zip((site_dialog, widget_dialog), watchers, strict=True):
        io_loop.run_sync(lambda d=dialog_id: api.post_operator(alice, d, "after the storm"))
        last = sql.execute("SELECT last_seq FROM dialogs WHERE id = %s", (dialog_id,)).fetchone()[0]
        io_loop.run_sync(lambda w=watcher, s=last: w.wait_for_seq(s))
        assert watcher.seqs[-1] == last and watcher.duplicates == 0 and watcher.gaps == 0
        assert watcher.messages[-1]["text"] == "after the storm"
