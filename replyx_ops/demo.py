"""The demo tenant `replyx run` creates so its "try it" lines work as printed.

Its credentials are kept in ``$REPLYX_DATA_DIR/demo.json`` (mode 0600), because
site and guest tokens are stored hashed and cannot be shown again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

import orjson

from backend import store
from backend.db import Database
from replyx import security
from replyx.settings import Settings

DEMO_EMAIL = "demo@replyx.local"


def demo_origins(settings: Settings) -> list[str]:
    origins = []
    for host in ("127.0.0.1", "localhost"):
        for port in (settings.nginx_port, settings.gateway_port, settings.backend_port):
            origins.append(f"http://{host}:{port}")
    return origins


async def _ensure(settings: Settings, url: str, saved: dict[str, Any]) -> dict[str, Any]:
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.session() as session:
            if saved and await store.user_exists(session, saved["user_id"]):
                assistant = await store.assistant_by_site_token(session, saved["site_token"])
                if assistant is not None:
                    return saved
            password = saved.get("password") or secrets.token_urlsafe(12)
            try:
                user_id = await store.create_user(session, DEMO_EMAIL, password)
            except store.EmailTakenError:
                # A demo user from an earlier data dir: start over under a fresh address.
                email = f"demo+{secrets.token_hex(3)}@replyx.local"
                user_id = await store.create_user(session, email, password)
            else:
                email = DEMO_EMAIL
            assistant = await store.create_assistant(
                session, user_id, "Demo assistant", demo_origins(settings)
            )
            site = await store.create_dialog(session, assistant.assistant_id, "site")
            widget = await store.create_dialog(session, assistant.assistant_id, "widget")
            return {
                "user_id": user_id,
                "email": email,
                "password": password,
                "assistant_id": assistant.assistant_id,
                "site_token": assistant.site_token,
                "site_dialog_id": site.dialog_id,
                "widget_dialog_id": widget.dialog_id,
                "guest_token": widget.guest_token,
            }
    finally:
        await db.dispose()


def ensure_demo_tenant(settings: Settings, url: str) -> dict[str, Any]:
    path = settings.data_dir / "demo.json"
    saved = orjson.loads(path.read_bytes()) if path.exists() else {}
    tenant = asyncio.run(_ensure(settings, url, saved))
    if tenant != saved:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(tenant, option=orjson.OPT_INDENT_2))
    return tenant


def try_it_lines(settings: Settings, tenant: dict[str, Any]) -> list[str]:
    """The migration guide's wscat and curl lines, with the demo tenant's ids and tokens."""
    host = settings.host
    ws = f"ws://{host}:{settings.gateway_port}"
    api = f"http://{host}:{settings.backend_port}"
    origin = f"http://{host}:{settings.nginx_port}"
    token = security.issue_operator_token(
        tenant["user_id"], settings.jwt_secret(), settings.jwt_ttl_seconds
    )
    site_dialog = tenant["site_dialog_id"]
    widget_dialog = tenant["widget_dialog_id"]
    return [
        f"  operator {tenant['email']} / {tenant['password']}"
        f"  (saved in {settings.data_dir}/demo.json)",
        "  # 1. the admin panel on a dialog",
        f'  wscat -c "{ws}/ws/dialogs/{site_dialog}?token={token}"',
        "  # 2. the widget on the demo widget dialog",
        f'  wscat -H "Origin: {origin}" -c "{ws}/ws/widget/dialogs/{widget_dialog}'
        f'?assistant_id={tenant["assistant_id"]}&guest_token={tenant["guest_token"]}"',
        "  # 3. a site integration on the same dialog as the admin panel",
        f'  wscat -c "{ws}/ws/site/dialogs/{site_dialog}?site_token={tenant["site_token"]}"',
        "  # 4. send a message through the API: it reaches sockets 1 and 3",
        # (The guide's `-G -d site_token=…` form would move the JSON body into the URL too.)
        f'  curl -X POST "{api}/api/site/dialogs/{site_dialog}/messages'
        f'?site_token={tenant["site_token"]}"'
        f" -H 'Content-Type: application/json' -d '{{\"text\": \"Test message\"}}'",
        "  # 5. or from psql (.venv/bin/replyx psql):",
        f"  INSERT INTO messages (dialog_id, sender, text) VALUES ({site_dialog}, 'system', 'hi');",  # noqa: S608
    ]
