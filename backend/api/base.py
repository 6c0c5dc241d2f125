"""What every API handler shares: JSON in and out, credentials, and errors at the edge.

Errors are translated by :class:`replyx.web.JsonHandler` (shared with the
gateway's HTTP side); this module says which errors of SQLAlchemy and psycopg
mean "the database cannot be reached" (503).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
import psycopg
import tornado.http1connection
import tornado.httputil
import tornado.web
from sqlalchemy import exc as sa_exc

from backend import metrics, store, workspace
from backend.db import Database
from backend.worker import SETTING as IN_FLIGHT
from backend.worker import InFlight
from replyx import security
from replyx.addresses import client_address, is_direct_loopback, limit_key
from replyx.protocol import MAX_ID, non_negative_int, positive_id
from replyx.settings import Settings
from replyx.web import ApiError, JsonHandler

__all__ = ["ApiError", "ApiHandler", "NotFoundHandler", "is_database_unavailable", "parse_id",
           "worker_id"]

log = logging.getLogger("backend.api")

MAX_BODY_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 32 * 1024

# An opaque name for this worker, shown to callers that are not on this host: which worker
# answered, without handing a PID (or how many processes run here) to the internet.
_WORKER_NAMES: dict[int, str] = {}


def worker_id(request: tornado.httputil.HTTPServerRequest) -> str:
    """Which worker answers: its PID for a direct caller on this host, else an opaque name."""
    pid = os.getpid()
    if is_direct_loopback(request):
        return str(pid)
    # Keyed by PID: a name made before a fork must not be shared by the forked workers.
    name = _WORKER_NAMES.get(pid)
    if name is None:
        name = _WORKER_NAMES[pid] = "w-" + secrets.token_hex(4)
    return name


def is_database_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.InterfaceError | ConnectionError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc.orig, psycopg.OperationalError | psycopg.InterfaceError
        )
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


def parse_id(raw: str, what: str = "dialog") -> int:
    """A path id: a positive 64-bit integer, else 404 (an id that cannot exist is not found)."""
    value = positive_id(raw)
    if value is None:
        raise ApiError(404, f"{what} not found")
    return value


@tornado.web.stream_request_body
class ApiHandler(JsonHandler):
    """Base of every JSON endpoint. Bodies are streamed so oversize ones are refused early."""

    db: Database
    config: Settings

    def initialize(
        self, db: Database, config: Settings, jwt_secret: bytes, metrics_dir: Path | None
    ) -> None:
        self.db = db
        self.metrics_dir = metrics_dir
        self.config = config
        self._jwt_secret = jwt_secret
        self._body = bytearray()
        # Begun, not yet answered: an exiting worker waits for it (backend/worker.py).
        self._in_flight: InFlight | None = self.settings.get(IN_FLIGHT)
        if self._in_flight is not None:
            self._in_flight.begin()

    def on_finish(self) -> None:
        self._answered()

    def on_connection_close(self) -> None:
        self._answered()  # nobody is left to answer
        super().on_connection_close()

    def _answered(self) -> None:
        if self._in_flight is not None:
            self._in_flight.end()
            self._in_flight = None

    def set_default_headers(self) -> None:
        super().set_default_headers()
        # Which gunicorn worker answered: handy when checking that load spreads.
        self.set_header("X-Replyx-Worker", worker_id(self.request))

    def is_unavailable(self, exc: BaseException) -> bool:
        return is_database_unavailable(exc)

    async def prepare(self) -> None:
        connection = self.request.connection
        assert isinstance(connection, tornado.http1connection.HTTP1Connection)
        connection.set_max_body_size(MAX_BODY_BYTES)
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "bad Content-Length")
            if int(length) > MAX_BODY_BYTES:
                self.set_header("Connection", "close")
                raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")

    def data_received(self, chunk: bytes) -> None:
        self._body.extend(chunk)

    # -- input -------------------------------------------------------------

    def json_body(self) -> dict[str, Any]:
        if not self._body:
            raise ApiError(400, "a JSON object body is required")
        try:
            value = orjson.loads(self._body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "body must be a JSON object")
        return value

    @staticmethod
    def field_int(body: dict[str, Any], name: str, *, required: bool = True) -> int | None:
        value = body.get(name)
        if value is None:
            if required:
                raise ApiError(400, f"{name} is required")
            return None
        number = positive_id(value) if isinstance(value, int) else None
        if number is None:
            raise ApiError(400, f"{name} must be a positive integer")
        return number

    @staticmethod
    def field_str(
        body: dict[str, Any], name: str, *, required: bool = True, max_chars: int = 1000
    ) -> str | None:
        value = body.get(name)
        if value is None:
            if required:
                raise ApiError(400, f"{name} is required")
            return None
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string")
        if len(value) > max_chars:
            raise ApiError(413 if name == "text" else 400, f"{name} is over {max_chars} characters")
        if "\x00" in value:
            raise ApiError(400, f"{name} must not contain NUL characters")
        return value

    def read_seq(self, body: dict[str, Any]) -> int:
        """``{"seq": N}`` of a read receipt: a non-negative integer."""
        value = body.get("seq")
        seq = non_negative_int(value) if isinstance(value, int) else None
        if seq is None:
            raise ApiError(400, "seq must be a non-negative integer")
        return seq

    async def mark_read(
        self, principal: store.Principal, raw_id: str, side: workspace.Side
    ) -> None:
        """Move ``side``'s read seq of the principal's dialog forward; answer with it."""
        dialog_id = parse_id(raw_id)
        seq = self.read_seq(self.json_body())
        try:
            now = await workspace.mark_read(self.db, principal, dialog_id, side, seq)
        except workspace.ReadPastEndError:
            raise ApiError(400, "seq is past the dialog's last message") from None
        if now is None:
            raise await self.not_theirs(principal, dialog_id)
        self.write_json({"dialog_id": dialog_id, "side": side, "seq": now})

    def message_text(self, body: dict[str, Any]) -> str:
        text = self.field_str(body, "text", max_chars=MAX_TEXT_CHARS)
        assert text is not None
        if not text.strip():
            raise ApiError(400, "text must not be empty")
        return text

    def query_int(self, name: str, default: int, *, minimum: int = 0, maximum: int = MAX_ID) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default  # absent; present but empty is not a number (400 below)
        value = non_negative_int(raw)
        if value is None:
            raise ApiError(400, f"{name} must be a non-negative integer")
        if not minimum <= value <= maximum:
            raise ApiError(400, f"{name} must be between {minimum} and {maximum}")
        return value

    # -- credentials -------------------------------------------------------

    def operator_id(self) -> int:
        """The operator's user id from a valid JWT, else 401."""
        try:
            claims = security.verify_operator_token(
                self.credential("token"), self._jwt_secret,
                max_lifetime=self.config.jwt_max_lifetime,
            )
        except security.InvalidTokenError:
            raise ApiError(401, "missing, invalid or expired operator token") from None
        return claims.user_id

    def issue_operator_token(self, user_id: int) -> str:
        return security.issue_operator_token(
            user_id, self._jwt_secret, self.config.jwt_ttl_seconds
        )

    # -- limits for callers without an operator login --------------------------

    def address_key(self) -> str | None:
        """Whom a per-address limit counts: ``None`` for a direct caller on this host.

        Behind nginx every request carries ``X-Real-IP``; a request without a proxy
        header from loopback comes from this host (replyx check, the bench, a script),
        which per-address limits do not protect against.
        """
        if is_direct_loopback(self.request):
            return None
        return limit_key(client_address(self.request))

    def write_buckets(self, principal: store.Principal | None) -> list[store.Bucket]:
        """The limits of an anonymous message or typing POST: per address, per guest token."""
        config = self.config
        buckets = []
        address = self.address_key()
        if address is not None:
            buckets.append(store.Bucket(f"address-write:{address}", config.address_write_rate,
                                        config.address_write_burst))
        if principal is not None and principal.kind == "guest":
            buckets.append(store.Bucket(f"guest-write:{principal.value}",
                                        config.guest_write_rate, config.guest_write_burst))
        return buckets

    async def limit(self, buckets: list[store.Bucket]) -> None:
        """Count this request against ``buckets``; 429 with ``Retry-After`` when one is empty."""
        config = self.config
        # Past the longest refill every idle bucket is full: its row can go.
        forget_after = max(config.widget_dialog_burst / config.widget_dialog_rate,
                           config.address_write_burst / config.address_write_rate,
                           config.guest_write_burst / config.guest_write_rate, 60.0)
        wait = await store.take_tokens(self.db, buckets, forget_after)
        if wait is not None:
            seconds = str(math.ceil(wait))
            raise ApiError(429, f"too many requests; retry in {seconds} s",
                           {"Retry-After": seconds})

    # -- writing to a dialog ---------------------------------------------------

    async def post_message(
        self, principal: store.Principal, raw_id: str, sender: str, text: str
    ) -> None:
        """Store a message in the principal's dialog and answer 201 with it (the frame)."""
        dialog_id = parse_id(raw_id)
        request = self.request
        handled = request.request_time()
        rendered = await store.post_message(self.db, principal, dialog_id, sender, text)
        metrics.observe_message(handled, request.request_time() - handled)
        if rendered is None:
            raise await self.not_theirs(principal, dialog_id)
        self.write_json_text(rendered, 201)

    async def post_typing(self, principal: store.Principal, raw_id: str, sender: str) -> None:
        """Send an ephemeral typing event to the principal's dialog; answer 204."""
        dialog_id = parse_id(raw_id)
        if not await store.send_typing(self.db, principal, dialog_id, sender):
            raise await self.not_theirs(principal, dialog_id)
        self.set_status(204)
        self.finish()

    async def not_theirs(self, principal: store.Principal, dialog_id: int) -> ApiError:
        """The refusal for a write that matched no dialog: an unknown token, or not theirs."""
        if not await store.principal_exists(self.db, principal):
            return ApiError(401, f"invalid {principal.kind} token")
        return ApiError(404, "dialog not found")

    # -- output ------------------------------------------------------------

    def write_json_text(self, rendered: str, status: int = 200) -> None:
        """Send JSON the database already rendered (a message), without re-encoding it."""
        self.set_status(status)
        self.finish(rendered.encode())


class NotFoundHandler(ApiHandler):
    """JSON 404 for every path no route matches."""

    async def prepare(self) -> None:
        raise ApiError(404, "not found")
