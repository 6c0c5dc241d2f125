"""Widget endpoints: anonymous visitors on customer sites, authorised by origin then guest token.

Browsers call these cross-origin from the embedding page, so they answer CORS
preflights, but only for an origin the widget may run on: the widget host
(``REPLYX_WIDGET_ORIGIN``) or a domain of some assistant, never a reflection of
whatever ``Origin`` arrived. No cookies are involved: the guest token is a
bearer credential. Every call is counted per client address (and per guest
token) in Postgres, so all workers share the limits.
"""

from __future__ import annotations

import logging

from backend import store
from backend.api.base import ApiError, ApiHandler
from replyx.logs import clip
from replyx.origins import effective_origin, normalize_origin, origin_allowed

log = logging.getLogger("backend.widget")


class WidgetHandler(ApiHandler):
    #: The request's ``Origin``, once it is known to be one the widget may run on.
    cors_origin: str | None = None
    #: The ``parent_origin`` a widget write named (for the log line of a refusal).
    claimed_parent: str | None = None

    def set_default_headers(self) -> None:
        super().set_default_headers()
        # Called again when an error clears the headers: a checked origin may read the error.
        if self.cors_origin is not None:
            self.set_header("Access-Control-Allow-Origin", self.cors_origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.set_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.set_header("Access-Control-Expose-Headers", "Retry-After")
            self.set_header("Access-Control-Max-Age", "600")
        self.set_header("Vary", "Origin")

    def allow_cors(self) -> None:
        """Let the page that sent this request read the answer (its origin was checked)."""
        self.cors_origin = self.request.headers.get("Origin")
        self.set_default_headers()

    async def options(self, *args: str) -> None:
        # A preflight names no assistant: any origin the widget may run on is answered.
        origin = normalize_origin(self.request.headers.get("Origin"))
        if origin is not None and (
            origin == self.config.widget_origin or await store.origin_registered(self.db, origin)
        ):
            self.allow_cors()
        self.set_status(204)
        self.finish()

    def refuse_origin(self, what: str, parent_origin: str | None) -> ApiError:
        """The 403 of the widget's origin rule, logged as the gateway logs a refused socket."""
        origin = self.request.headers.get("Origin")
        effective = effective_origin(origin, parent_origin, self.config.widget_origin)
        log.warning("[Widget] WEBSOCKET_4003_ERROR refused %s: origin=%s effective=%s",
                    what, clip(origin or "-"), clip(effective or "-"))
        return ApiError(403, "origin not allowed for this assistant")

    async def guest(self, parent_origin: str | None) -> store.Principal:
        """The guest token's principal, with the page origin its dialog must allow.

        The request is counted (per address, per guest token) before its origin is
        judged, so refusals, and their log lines, cannot outpace the limits.
        """
        token = self.credential("guest_token")
        if not token:
            raise ApiError(401, "guest_token is required")
        await self.limit(self.write_buckets(store.Principal.guest(token)))
        self.claimed_parent = parent_origin
        origin = self.request.headers.get("Origin")
        if origin is None:
            return store.Principal.guest(token)
        effective = effective_origin(origin, parent_origin, self.config.widget_origin)
        if effective is None:
            raise self.refuse_origin("widget write", parent_origin)
        return store.Principal.guest(token, effective)

    def allow_cors_if_written(self, principal: store.Principal) -> None:
        """The write checks the origin in its own statement: if it succeeds, the origin was
        allowed, so the headers are set now (before the answer goes); a refusal
        (:meth:`not_theirs`) takes them back."""
        if principal.origin is not None:
            self.allow_cors()

    async def not_theirs(self, principal: store.Principal, dialog_id: int) -> ApiError:
        self.cors_origin = None
        if principal.origin is not None:
            domains = await store.guest_dialog_domains(self.db, principal, dialog_id)
            if domains is not None and principal.origin not in domains:
                return self.refuse_origin(f"widget write: dialog_id={dialog_id}",
                                          self.claimed_parent)
        return await super().not_theirs(principal, dialog_id)

    def parent_origin(self) -> str | None:
        """``?parent_origin=``: the embedding page, when the widget runs in our iframe."""
        value = self.get_query_argument("parent_origin", None)
        return value[:300] if value else None


class WidgetDialogsHandler(WidgetHandler):
    async def post(self) -> None:
        address = self.address_key()
        if address is not None:
            config = self.config
            await self.limit([store.Bucket(f"widget-dialog:{address}", config.widget_dialog_rate,
                                           config.widget_dialog_burst)])
        body = self.json_body()
        assistant_id = self.field_int(body, "assistant_id")
        parent_origin = self.field_str(body, "parent_origin", required=False, max_chars=300)
        assert assistant_id is not None
        async with self.db.session() as session:
            assistant = await store.assistant_by_id(session, assistant_id)
            if assistant is None:
                raise ApiError(404, "assistant not found")
            origin = self.request.headers.get("Origin")
            if not origin_allowed(
                origin, parent_origin, assistant.domains, self.config.widget_origin
            ):
                raise self.refuse_origin(f"widget dialog: assistant_id={assistant_id}",
                                         parent_origin)
            self.allow_cors()
            created = await store.create_dialog(session, assistant.id, "widget")
        self.write_json({"dialog_id": created.dialog_id, "guest_token": created.guest_token}, 201)


class WidgetMessagesHandler(WidgetHandler):
    async def post(self, raw_id: str) -> None:
        body = self.json_body()
        parent_origin = (self.field_str(body, "parent_origin", required=False, max_chars=300)
                         or self.parent_origin())
        principal = await self.guest(parent_origin)
        text = self.message_text(body)
        self.allow_cors_if_written(principal)
        await self.post_message(principal, raw_id, "visitor", text)


class WidgetReadHandler(WidgetHandler):
    """``POST /api/widget/dialogs/{id}/read {"seq"}``: the visitor has read up to ``seq``."""

    async def post(self, raw_id: str) -> None:
        body = self.json_body()
        parent_origin = (self.field_str(body, "parent_origin", required=False, max_chars=300)
                         or self.parent_origin())
        principal = await self.guest(parent_origin)
        self.allow_cors_if_written(principal)
        await self.mark_read(principal, raw_id, "visitor")


class WidgetTypingHandler(WidgetHandler):
    async def post(self, raw_id: str) -> None:
        principal = await self.guest(self.parent_origin())
        self.allow_cors_if_written(principal)
        await self.post_typing(principal, raw_id, "visitor")
