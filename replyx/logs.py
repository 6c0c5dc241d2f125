"""Logging: one line per event on stderr, and access lines that never carry a secret.

Query strings carry tokens (``?token=``, ``?site_token=``, ``?guest_token=``)
because browsers cannot set headers on a WebSocket, so access lines log the
path alone and the names of the query parameters, never their values.
"""

from __future__ import annotations

import logging
import re
import sys
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from tornado.log import app_log, gen_log
from tornado.web import HTTPError

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest
    from tornado.web import RequestHandler

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

access_log = logging.getLogger("replyx.access")

# A query parameter's value in a URI quoted anywhere in a line: `?token=…`, `&since=…`.
_QUERY_VALUE = re.compile(r"([?&][^=&\s#\"']{1,64}=)[^&\s#\"']*")


def redact_query_values(text: str) -> str:
    """``GET /ws/dialogs/5?token=abc&since=3 (1.2.3.4)`` → ``… ?token=…&since=… (1.2.3.4)``."""
    if "=" not in text:
        return text
    return _QUERY_VALUE.sub(r"\1…", text)


class RedactQueries(logging.Filter):
    """Tornado's own warnings and errors quote the request URI (``400 GET /path?… (ip)``,
    ``repr(request)`` after an uncaught exception) with its query string, where browsers
    put their tokens. Those records are rewritten; ours never carry a query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("tornado"):
            message = record.getMessage()
            redacted = redact_query_values(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactQueries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Tornado's own access log would print full URIs with their tokens: ours replaces it.
    logging.getLogger("tornado.access").disabled = True
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("asyncpg").setLevel(max(logging.getLevelName(level), logging.INFO))


def redact_uri(uri: str) -> str:
    """``/ws/dialogs/5?token=abc&since=3`` → ``/ws/dialogs/5?token=…&since=…``."""
    parts = urlsplit(uri)
    if not parts.query:
        return parts.path
    names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    return parts.path + "?" + "&".join(f"{name[:40]}=…" for name in names[:20])


def log_request(handler: RequestHandler) -> None:
    """Tornado ``log_function``: method, redacted URI, status, time, peer."""
    status = handler.get_status()
    if status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    request = handler.request
    access_log.log(
        level,
        "%d %s %s %.1fms peer=%s",
        status,
        request.method,
        redact_uri(request.uri or ""),
        1000.0 * request.request_time(),
        request.remote_ip,
    )


class RedactedRequestLogging:
    """Mixin for Tornado handlers: error log lines name the request without query values.

    Tornado's own ``log_exception`` prints ``_request_summary()`` (the raw URI)
    for an ``HTTPError`` and, for anything else, the request's repr, which
    also holds the raw URI: a ``?token=`` would land in the log.
    """

    request: HTTPServerRequest

    def _request_summary(self) -> str:
        request = self.request
        return f"{request.method} {redact_uri(request.uri or '')} ({request.remote_ip})"

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(value, HTTPError):
            message = value.get_message()
            if message:
                gen_log.warning("%d %s: %s", value.status_code, self._request_summary(), message)
            return
        exc_info = (typ, value, tb) if typ is not None and value is not None else None
        app_log.error("Uncaught exception %s", self._request_summary(), exc_info=exc_info)
