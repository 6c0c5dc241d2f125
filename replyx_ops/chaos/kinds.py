"""The soak's endpoints: who the clients are (:class:`Tenancy`) and how each kind of dialog
socket is addressed (:class:`SocketKind`).

A kind is the URL and origin of its endpoint, which dialogs it may open and whether
a ``4001`` can be cured by a new credential (the operator panel logs in again). The
same kind serves both transports: a subscriber with ``transport="sse"`` reads the
endpoint's ``/sse/`` twin of the same URL. The tenant has two operators: the owner,
whose panels are open all along, and a team member whose panels only come and go
(bursts), so that ``operators_online`` moves and a ghost of it can be seen.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from replyx import security
from replyx_ops.bench.servers import Tenant


@dataclass
class Tenancy:
    """What kinds need to build URLs: the tenant, where sockets go, how tokens are issued."""

    tenant: Tenant
    ws_base: str
    jwt_secret: bytes
    token_ttl: int = 3600
    #: The assistant's operators (user ids): the owner first.
    operators: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.operators and self.tenant is not None:
            self.operators = [self.tenant.user_id]

    def operator_token(self, ttl: int | None = None, user_id: int | None = None) -> str:
        return security.issue_operator_token(
            user_id if user_id is not None else self.tenant.user_id, self.jwt_secret,
            ttl or self.token_ttl)

    def add_operator(self) -> int:
        """A second operator of the tenant's assistant (a team member), in the database."""
        with self.tenant.db.connect() as conn:
            row = conn.execute(
                "INSERT INTO users (email, password_hash) VALUES (%s, %s) RETURNING id",
                ("member@replyx.invalid", security.hash_password(secrets.token_urlsafe(16))),
            ).fetchone()
            assert row is not None
            user_id = int(row[0])
            conn.execute("INSERT INTO assistant_operators (assistant_id, user_id)"
                         " VALUES (%s, %s)", (self.tenant.assistant_id, user_id))
        self.operators.append(user_id)
        return user_id


class SocketKind:
    """One endpoint. Subclasses set ``name`` and build URLs."""

    name = ""
    #: A 4001 can be cured by a new credential (the panel logs in again).
    renewable = False
    origin: str | None = None

    def accepts(self, tenancy: Tenancy, dialog_id: int) -> bool:
        return True

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None,
            user_id: int | None = None) -> str:
        raise NotImplementedError


class AdminKind(SocketKind):
    name = "admin"
    renewable = True

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None,
            user_id: int | None = None) -> str:
        token = tenancy.operator_token(token_ttl, user_id)
        return f"{tenancy.ws_base}/ws/dialogs/{dialog_id}?token={token}"


class WidgetKind(SocketKind):
    name = "widget"
    origin = Tenant.ORIGIN

    def accepts(self, tenancy: Tenancy, dialog_id: int) -> bool:
        return dialog_id in tenancy.tenant.guest_tokens

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None,
            user_id: int | None = None) -> str:
        return tenancy.ws_base + tenancy.tenant.widget_path(dialog_id)


class SiteKind(SocketKind):
    name = "site"

    def accepts(self, tenancy: Tenancy, dialog_id: int) -> bool:
        return dialog_id not in tenancy.tenant.guest_tokens

    def url(self, tenancy: Tenancy, dialog_id: int, token_ttl: int | None = None,
            user_id: int | None = None) -> str:
        return tenancy.ws_base + tenancy.tenant.site_path(dialog_id)


KINDS: dict[str, SocketKind] = {k.name: k for k in (AdminKind(), WidgetKind(), SiteKind())}
