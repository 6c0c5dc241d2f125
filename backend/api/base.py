"""What every API handler shares: JSON in and out, credentials, and errors at the edge.

Errors are translated here, once: :class:`ApiError` becomes its status with
``{"error": …}``; a database that cannot be reached becomes 503; anything else
is a 500 with a generic body (the traceback goes to the log, never the client).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
import psycopg
import tornado.web
from sqlalchemy import exc as sa_exc

from backend import store
from backend.db import Database
from replyx import security
from replyx.config import Settings
from replyx.logs import RedactedRequestLogging
from replyx.protocol import MAX_ID, non_negative_int, positive_id

log = logging.getLogger("backend.api")

MAX_BODY_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 32 * 1024
_PID = str(os.getpid())


class ApiError(Exception):
    """An error the client caused (or may retry): status, a short message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


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
class ApiHandler(RedactedRequestLogging, tornado.web.RequestHandler):
    """Base of every JSON endpoint. Bodies are streamed so oversize ones are refused early."""

    db: Database
    config: Settings

    def initialize(self, db: Database, config: Settings, jwt_secret: bytes) -> None:
        self.db = db
        self.config = config
        self._jwt_secret = jwt_secret
        self._body = bytearray()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        # Which gunicorn worker answered: handy when checking that load spreads.
        self.set_header("X-Replyx-Worker", _PID)

    async def prepare(self) -> None:
        self.request.connection.set_max_body_size(MAX_BODY_BYTES)
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

    def message_text(self, body: dict[str, Any]) -> str:
        text = self.field_str(body, "text", max_chars=MAX_TEXT_CHARS)
        assert text is not None
        if not text.strip():
            raise ApiError(400, "text must not be empty")
        return text

    def query_int(self, name: str, default: int, *, minimum: int = 0, maximum: int = MAX_ID) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        value = non_negative_int(raw)
        if value is None:
            raise ApiError(400, f"{name} must be a non-negative integer")
        if not minimum <= value <= maximum:
            raise ApiError(400, f"{name} must be between {minimum} and {maximum}")
        return value

    # -- credentials -------------------------------------------------------

    def bearer_or_query(self, query_name: str) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return self.get_query_argument(query_name, None) or None

    def operator_id(self) -> int:
        """The operator's user id from a valid JWT, else 401."""
        try:
            claims = security.verify_operator_token(self.bearer_or_query("token"), self._jwt_secret)
        except security.InvalidTokenError:
            raise ApiError(401, "missing, invalid or expired operator token") from None
        return claims.user_id

    def issue_operator_token(self, user_id: int) -> str:
        return security.issue_operator_token(
            user_id, self._jwt_secret, self.config.jwt_ttl_seconds
        )

    # -- writing to a dialog ---------------------------------------------------

    async def post_message(
        self, principal: store.Principal, raw_id: str, sender: str, text: str
    ) -> None:
        """Store a message in the principal's dialog and answer 201 with it (the frame)."""
        rendered = await store.post_message(self.db, principal, parse_id(raw_id), sender, text)
        if rendered is None:
            raise await self.not_theirs(principal)
        self.write_json_text(rendered, 201)

    async def post_typing(self, principal: store.Principal, raw_id: str, sender: str) -> None:
        """Send an ephemeral typing event to the principal's dialog; answer 204."""
        if not await store.send_typing(self.db, principal, parse_id(raw_id), sender):
            raise await self.not_theirs(principal)
        self.set_status(204)
        self.finish()

    async def not_theirs(self, principal: store.Principal) -> ApiError:
        """The refusal for a write that matched no dialog: an unknown token, or not theirs."""
        if not await store.principal_exists(self.db, principal):
            return ApiError(401, f"invalid {principal.kind} token")
        return ApiError(404, "dialog not found")

    # -- output ------------------------------------------------------------

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(value))

    def write_json_text(self, rendered: str, status: int = 200) -> None:
        """Send JSON the database already rendered (a message), without re-encoding it."""
        self.set_status(status)
        self.finish(rendered.encode())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            self.set_status(exc.status)
            for name, value in exc.headers.items():
                self.set_header(name, value)
            message = exc.message
        elif exc is not None and is_database_unavailable(exc):
            self.set_status(503)
            self.set_header("Retry-After", "1")
            message = "database unavailable, retry shortly"
        elif isinstance(exc, tornado.web.HTTPError):
            # Tornado's own errors may carry the offending value in their arguments (say, the
            # first bytes of a query parameter): the client gets the plain reason instead.
            message = exc.log_message if exc.log_message and not exc.args else self._reason
            if exc.status_code == 405:
                message = "method not allowed"
        else:
            message = self._reason if status_code < 500 else "internal error"
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(orjson.dumps({"error": message}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            return
        if value is not None and is_database_unavailable(value):
            log.warning(
                "%s %s: database unavailable (%s)",
                self.request.method, self.request.path, type(value).__name__,
            )
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(ApiHandler):
    """JSON 404 for every path no route matches."""

    async def prepare(self) -> None:
        raise ApiError(404, "not found")
