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
from sqlalchemy.ext.asyncio import AsyncSession

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


async def _create(session: AsyncSession, settings: Settings, password: str) -> dict[str, Any]:
    try:
        user_id = await store.create_user(session, DEMO_EMAIL, password)
    except store.EmailTakenError:
        # A demo user from an earlier data dir: start over under a fresh address.
        email = f"demo+{secrets.token_hex(3)}@replyx.local"
        user_id = await store.create_user(session, email, password)
    else:
        email = DEMO_EMAIL
    created = await store.create_assistant(
        session, user_id, "Demo assistant", demo_origins(settings)
    )
    return {"user_id": user_id, "email": email, "password": password,
            "assistant_id": created.assistant_id, "site_token": created.site_token}


async def _ensure(settings: Settings, url: str, saved: dict[str, Any]) -> dict[str, Any]:
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.session() as session:
            assistant = None
            if saved and await store.user_exists(session, saved["user_id"]):
                assistant = await store.assistant_by_site_token(session, saved["site_token"])
            if assistant is None:
                tenant = await _create(
                    session, settings, saved.get("password") or secrets.token_urlsafe(12)
                )
            else:
                tenant = dict(saved)
                # The ports may have changed since the tenant was made (an old ./var, other
                # BACKEND_PORT/GATEWAY_PORT/NGINX_PORT): its origins follow the ones in use.
                origins = demo_origins(settings)
                if list(assistant.domains) != origins:
                    assistant.domains = origins
                    await session.commit()
            if "dialog_id" not in tenant:
                # One widget dialog that the admin, widget and site sockets all open.
                dialog = await store.create_dialog(session, tenant["assistant_id"], "widget")
                tenant["dialog_id"] = dialog.dialog_id
                tenant["guest_token"] = dialog.guest_token
            for old in ("site_dialog_id", "widget_dialog_id"):  # demo.json of older versions
                tenant.pop(old, None)
            return tenant
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
    """The migration guide's first scenario: admin, widget and site sockets on ONE dialog."""
    host = settings.host
    ws = f"ws://{host}:{settings.gateway_port}"
    api = f"http://{host}:{settings.backend_port}"
    # Any of the demo assistant's origins will do; wscat sends it as the page's origin.
    origin = f"http://{host}:{settings.gateway_port}"
    token = security.issue_operator_token(
        tenant["user_id"], settings.jwt_secret(), settings.jwt_ttl_seconds
    )
    dialog = tenant["dialog_id"]
    return [
        f"  operator {tenant['email']} / {tenant['password']}"
        f"  (saved in {settings.data_dir}/demo.json)",
        f"  # three terminals, three kinds of socket, all on dialog {dialog}:",
        "  # 1. the admin panel (operator JWT)",
        f'  wscat -c "{ws}/ws/dialogs/{dialog}?token={token}"',
        "  # 2. the site widget (guest token; the Origin must be one of the assistant's domains)",
        f'  wscat -H "Origin: {origin}" -c "{ws}/ws/widget/dialogs/{dialog}'
        f'?assistant_id={tenant["assistant_id"]}&guest_token={tenant["guest_token"]}"',
        "  # 3. a site integration (site token)",
        f'  wscat -c "{ws}/ws/site/dialogs/{dialog}?site_token={tenant["site_token"]}"',
        "  # 4. send a message through the API: it reaches all three sockets",
        # (The guide's `-G -d site_token=…` form would move the JSON body into the URL too.)
        f'  curl -X POST "{api}/api/site/dialogs/{dialog}/messages'
        f'?site_token={tenant["site_token"]}"'
        f" -H 'Content-Type: application/json' -d '{{\"text\": \"Test message\"}}'",
        "  # 5. or from psql (.venv/bin/replyx psql):",
        f"  INSERT INTO messages (dialog_id, sender, text) VALUES ({dialog}, 'system', 'hi');",  # noqa: S608
    ]
