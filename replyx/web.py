"""The one JSON handler base of both servers: headers, errors at the edge, bearer credentials.

Errors are translated here, once: :class:`ApiError` becomes its status with
``{"error": …}`` (and its headers); an error that means "the database cannot
be reached right now" (:meth:`JsonHandler.is_unavailable`, which each server
defines for its driver) becomes 503 with ``Retry-After``; Tornado's own
errors keep their status with a plain reason; anything else is a 500 with a
generic body, the traceback going to the log and never to the client.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
import tornado.web
from tornado.httputil import HTTPHeaders

from replyx.logs import RedactedRequestLogging

log = logging.getLogger("replyx.web")

_NAME = re.compile(r"[A-Za-z_]{1,40}")

UNAVAILABLE = "database unavailable, retry shortly"


class ApiError(Exception):
    """An error the client caused (or may retry): status, a short message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bearer(headers: HTTPHeaders) -> str | None:
    """The credential of an ``Authorization: Bearer …`` header, if there is one."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class JsonHandler(RedactedRequestLogging, tornado.web.RequestHandler):
    """JSON in and out; subclasses define :meth:`is_unavailable` for their database driver."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def is_unavailable(self, exc: BaseException) -> bool:
        """True for errors that mean "the database cannot be reached right now"."""
        return False

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """A path or query value as text; 400 naming it (never quoting it) if it is not UTF-8.

        Tornado's own refusal quotes the value's first 40 bytes, which for ``?token=``
        are most of a credential.
        """
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            what = "the path" if name is None else (
                name if _NAME.fullmatch(name) else "a query parameter")
            raise ApiError(400, f"{what} is not valid UTF-8") from None

    def credential(self, query_name: str) -> str | None:
        """A bearer header, else the ``query_name`` query value (browsers cannot set headers)."""
        return bearer(self.request.headers) or self.get_query_argument(query_name, None) or None

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            self.set_status(exc.status)
            for name, value in exc.headers.items():
                self.set_header(name, value)
            message = exc.message
        elif exc is not None and self.is_unavailable(exc):
            self.set_status(503)
            self.set_header("Retry-After", "1")
            message = UNAVAILABLE
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
        if value is not None and self.is_unavailable(value):
            log.warning("%s: database unavailable (%s)", self._request_summary(),
                        type(value).__name__)
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(JsonHandler):
    """JSON 404 for every path no route matches."""

    def prepare(self) -> None:
        raise ApiError(404, "not found")
