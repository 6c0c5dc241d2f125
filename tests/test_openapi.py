"""docs/openapi.json describes the HTTP API as built, and the live API keeps to it.

* every route of ``backend/app.py`` (path and method) is in the document, and the
  document describes nothing else;
* the backend serves the document at ``GET /api/openapi.json``;
* schemathesis drives every operation of a live in-process backend on the test
  database with valid and invalid inputs: no 5xx, every status, content type,
  header and body as described, invalid input refused with a 4xx.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
import schemathesis
import tornado.netutil
import tornado.web
from schemathesis import GenerationMode
from tornado.httpserver import HTTPServer

from backend import store
from backend.api.openapi import DOCUMENT
from backend.app import ID, ROUTES, build_application
from backend.db import Database
from tests.fix_apps import Api
from tests.fix_db import create_tenant, make_settings, run_async
from tests.fix_secrets import remember

METHODS = ("get", "post", "put", "patch", "delete")
#: The address schemathesis' requests count under (X-Real-IP, believed from loopback): its
#: failed logins must not lock 127.0.0.1 out of the login of other tests.
FUZZ_ADDRESS = "192.0.2.77"
#: Per operation and mode: enough to find what is wrong, short enough for `make test`.
MAX_EXAMPLES = 20


def document() -> dict[str, Any]:
    return orjson.loads(DOCUMENT.read_bytes())


def described() -> set[tuple[str, str]]:
    return {
        (re.sub(r"\{[^}]+\}", "{}", path), method.upper())
        for path, item in document()["paths"].items()
        for method in item if method in METHODS
    }


def routed() -> set[tuple[str, str]]:
    found = set()
    for pattern, handler in ROUTES:
        for method in METHODS:
            if getattr(handler, method) is not getattr(tornado.web.RequestHandler, method):
                found.add((pattern.replace(ID, "{}"), method.upper()))
    return found


def test_every_route_is_described_and_nothing_else() -> None:
    assert routed() - described() == set(), "routes missing from docs/openapi.json"
    assert described() - routed() == set(), "docs/openapi.json describes routes that do not exist"


def test_the_document_is_openapi_3_1_and_every_operation_says_its_errors() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation.get("operationId") and operation.get("summary"), (path, method)
            assert "security" in operation, (path, method)  # auth said explicitly, even "none"
            codes = set(operation["responses"])
            assert any(c.startswith("2") for c in codes), (path, method)
            if any(s for s in operation["security"]):
                assert "401" in codes, (path, method)


@pytest.mark.gen_test
async def test_the_backend_serves_the_document(api: Api) -> None:
    response = await api.request("GET", "/api/openapi.json")
    assert response.code == 200
    assert response.body == document()
    assert response.headers["Content-Type"].startswith("application/json")


# -- schemathesis against the live backend -------------------------------------------------


@pytest.fixture(scope="module")
def live_backend(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The backend on its own thread and event loop: schemathesis' client is synchronous."""
    # The rate limits are not what this checks (tests/test_hostile_rate_limits.py does):
    # generous ones, so a limit never answers before the credential is judged.
    settings = make_settings(
        tmp_path_factory.mktemp("openapi"),
        REPLYX_WIDGET_DIALOG_BURST="100000", REPLYX_ADDRESS_WRITE_BURST="100000",
        REPLYX_GUEST_WRITE_BURST="100000",
    )
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        db = Database(database_url)
        server = HTTPServer(build_application(settings, db, settings.jwt_secret()))
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        box["url"] = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        try:
            await box["stop"].wait()
        finally:
            server.stop()
            await server.close_all_connections()
            await db.dispose()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30), "the backend did not start"
    yield box["url"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(30)


@dataclass
class Fuzz:
    schema: Any
    base_url: str
    dialog_id: int
    #: The bearer credential of each audience, all good for ``dialog_id``.
    bearer: dict[str, str]


@pytest.fixture(scope="module")
def fuzz(live_backend: str, database_url: str) -> Fuzz:
    """The document loaded by schemathesis, and credentials for one dialog of every audience."""
    tenant = create_tenant(database_url)

    async def widget_dialog() -> store.NewDialog:
        db = Database(database_url, pool_size=1, max_overflow=0)
        try:
            async with db.session() as session:
                return await store.create_dialog(session, tenant.assistant_id, "widget")
        finally:
            await db.dispose()

    dialog = run_async(widget_dialog)
    assert dialog.guest_token is not None
    remember(dialog.guest_token, "guest token (schemathesis)")
    config = schemathesis.Config.from_dict({
        "checks": {
            # Valid-looking data for a dialog of someone else is rightly refused (404).
            "positive_data_acceptance": {"enabled": False},
            "use_after_free": {"enabled": False},
            "ensure_resource_availability": {"enabled": False},
            # Tornado answers 405 without an Allow header.
            "allow_header_conformance": {"enabled": False},
            # 413 (a text or body over its limit) refuses invalid input as well as 400 does.
            "negative_data_rejection": {"expected-statuses": [
                "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "429",
            ]},
        },
        "request-timeout": 30,
    })
    return Fuzz(
        schemathesis.openapi.from_dict(document(), config=config), live_backend,
        dialog.dialog_id,
        {"operator": tenant.token, "guest": dialog.guest_token, "site": tenant.site_token},
    )


def _has_inputs(operation: dict[str, Any]) -> bool:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    return bool(operation.get("parameters")) or bool(body.get("schema"))


CASES = [
    pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode.value}")
    for path, item in document()["paths"].items()
    for method, operation in item.items() if method in METHODS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _has_inputs(operation)
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_the_live_api_keeps_to_its_document(
    fuzz: Fuzz, method: str, path: str, mode: GenerationMode
) -> None:
    operation = fuzz.schema[path][method]
    # The operation's own credential (every audience takes a bearer), and the address its
    # failed logins count under.
    headers = {"X-Real-IP": FUZZ_ADDRESS}
    schemes = [name for alt in operation.definition.raw.get("security", []) for name in alt]
    for audience in ("operator", "guest", "site"):
        if any(name.startswith(audience) for name in schemes):
            headers["Authorization"] = f"Bearer {fuzz.bearer[audience]}"
            break
    # The one dialog these credentials may use: the operations reach their success paths
    # (201 with a message) as well as their refusals.
    fixed = {"dialog_id": fuzz.dialog_id} if "{dialog_id}" in path else None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed,
                                     headers=headers)

    @hypothesis.given(case=strategy)
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(hypothesis.HealthCheck))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=fuzz.base_url)

    run()


def test_the_document_lives_in_the_repository() -> None:
    assert DOCUMENT == Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


# -- the README's "HTTP API" table is the document's -----------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_START, TABLE_END = "<!-- http-api: generated from docs/openapi.json -->", "<!-- /http-api -->"
AUDIENCES = {"operator": "operator", "guest": "guest", "site": "site"}


def http_api_table() -> str:
    """The README's table: one row per operation of docs/openapi.json, in its order."""
    rows = ["| method and path | auth | does |", "|---|---|---|"]
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            schemes = [name for alt in operation["security"] for name in alt]
            auth = next((label for prefix, label in AUDIENCES.items()
                         if any(s.startswith(prefix) for s in schemes)), "—")
            if auth != "—" and {} in operation["security"]:
                auth += " (not from loopback)"
            auth = operation.get("x-replyx-auth", "").split(":")[0] or auth
            rows.append(f"| `{method.upper()} {path}` | {auth} | {operation['summary']} |")
    return "\n".join(rows)


def test_the_readme_http_api_table_is_the_documents() -> None:
    text = README.read_text()
    if TABLE_START not in text:
        pytest.skip("README.md has no generated HTTP API table yet")
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == http_api_table(), (
        "README.md's HTTP API table differs from docs/openapi.json; the table is:\n"
        + http_api_table()
    )


if __name__ == "__main__":
    print(http_api_table())  # python -m tests.test_openapi: the table for README.md
