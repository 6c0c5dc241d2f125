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
from urllib.parse import parse_qsl, unquote, urlsplit

from tornado.log import app_log, gen_log
from tornado.web import HTTPError

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest
    from tornado.web import RequestHandler

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

access_log = logging.getLogger("replyx.access")

# A query parameter's value in a URI quoted anywhere in a line: `?token=…`, `&since=…`.
_QUERY_VALUE = re.compile(r"([?&][^=&\s#\"']{1,64}=)[^&\s#\"']*")


# Our credentials by their shape, whole or in part: site and guest tokens, and JWTs
# (base64url of '{"'). The last line of defence for text that quotes a request.
_SECRET_SHAPES = re.compile(r"rx[sg]_[A-Za-z0-9_-]+|eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}")
#: The most characters of a client-chosen value (an Origin, a path) a log line quotes.
CLIP_CHARS = 120


def redact_secrets(text: str) -> str:
    """Replace anything shaped like one of our credentials (or a piece of one) with ``…``."""
    if "rx" not in text and "eyJ" not in text:
        return text
    return _SECRET_SHAPES.sub(lambda m: m.group(0)[:4] + "…", text)


def clip(value: str, limit: int = CLIP_CHARS) -> str:
    """A client-chosen value as a log line may quote it: short, no credentials, one line."""
    text = redact_secrets(value)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(text) > limit:
        return f"{text[:limit]}…({len(value)} chars)"
    return text


def redact_query_values(text: str) -> str:
    """``GET /ws/dialogs/5?token=abc&since=3 (1.2.3.4)`` → ``… ?token=…&since=… (1.2.3.4)``."""
    if "=" not in text:
        return redact_secrets(text)
    return redact_secrets(_QUERY_VALUE.sub(r"\1…", text))


class RedactQueries(logging.Filter):
    """Tornado's own warnings and errors quote the request URI (``400 GET /path?… (ip)``,
    ``repr(request)`` after an uncaught exception) with its query string, where browsers
    put their tokens. Those records are rewritten; ours never carry a query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # Tornado's lines quote raw URIs; any line may quote a credential some other way.
        redacted = (redact_query_values(message) if record.name.startswith("tornado")
                    else redact_secrets(message))
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class LineFormatter(logging.Formatter):
    """The line prefix (time, level, process, logger) on every line of a message.

    A record may carry several lines (:class:`HeldLines`); each must still read, and
    grep, as a line of its own. A traceback is left as it is.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        message = record.message
        if "\n" not in message or not text.endswith(message):
            return text
        head = text[: len(text) - len(message)]
        return "\n".join(head + line for line in message.split("\n"))


class HeldLines:
    """Log lines of a hot path, held and then logged as one record: one write for many lines.

    ``add`` costs a level check and an append; the lines are formatted, and written in
    one ``write``, by :meth:`flush`, which the hot path calls when it is done (the
    gateway's consumer, once a batch's frames are with the kernel). Each line keeps
    the usual prefix (:class:`LineFormatter`), so ``grep`` finds them as before.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level
        self.lines: list[tuple[str, tuple[object, ...]]] = []

    def add(self, fmt: str, *args: object) -> None:
        if self.logger.isEnabledFor(self.level):
            self.lines.append((fmt, args))

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if lines:
            self.logger.log(self.level, "%s", "\n".join(fmt % args for fmt, args in lines))


def setup_logging(level: str = "INFO", *, name: str | None = None) -> None:
    """Log to stderr, one line per record, queries and secrets redacted.

    :param name: shown before the pid (``[gateway-2 27617]``), so that lines of several
        gateways stay apart once collected in one place.
    """
    handler = logging.StreamHandler(sys.stderr)
    tag = None if name is None else name.replace("%", "%%")
    fmt = FORMAT if tag is None else FORMAT.replace("[%(process)d]", f"[{tag} %(process)d]")
    handler.setFormatter(LineFormatter(fmt))
    handler.addFilter(RedactQueries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Tornado's own access log would print full URIs with their tokens: ours replaces it.
    logging.getLogger("tornado.access").disabled = True
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("asyncpg").setLevel(max(logging.getLevelName(level), logging.INFO))


def redact_uri(uri: str) -> str:
    """``/ws/dialogs/5?token=abc&since=3`` → ``/ws/dialogs/5?token=…&since=…``.

    The path is read as the server routes it, percent-decoded: a ``%3F`` there
    (``/ws/site/dialogs/3%3Fsite_token%3D…``) starts a query as far as the log is
    concerned, so what follows it is redacted like one. What remains is clipped,
    and anything shaped like a credential is masked wherever it stands.
    """
    parts = urlsplit(uri)
    path, hidden_query = _split_encoded_query(parts.path)
    queries = [q for q in (hidden_query, parts.query) if q]
    if not queries:
        return clip(path)
    names = [name for query in queries
             for name, _ in parse_qsl(query, keep_blank_values=True)]
    shown = "&".join(f"{redact_secrets(name[:40])}=…" for name in names[:20])
    return f"{clip(path)}?{shown}"


def _split_encoded_query(path: str) -> tuple[str, str]:
    """The decoded path up to its first ``?`` or ``#``, and what follows (a hidden query)."""
    if "%" not in path:
        return path, ""
    decoded = unquote(path, errors="replace")
    cut = min((i for i in (decoded.find("?"), decoded.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return decoded, ""
    return decoded[:cut], decoded[cut + 1:]


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


_NAME = re.compile(r"[A-Za-z_]{1,40}")


def http_error_text(error: HTTPError) -> str:
    """An ``HTTPError``'s message without the client's values it quotes.

    Tornado formats the offending value into some (``Invalid unicode in site_token:
    b'rxs_…'``, the first 40 bytes of a credential); only plain names survive here.
    """
    template = error.log_message or ""
    if not error.args:
        return redact_secrets(template)
    shown = tuple(arg if isinstance(arg, str) and _NAME.fullmatch(arg) else "…"
                  for arg in error.args)
    try:
        return redact_secrets(template % shown)
    except (TypeError, ValueError):
        return redact_secrets(template)


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
            message = http_error_text(value)
            if message:
                gen_log.warning("%d %s: %s", value.status_code, self._request_summary(), message)
            return
        exc_info = (typ, value, tb) if typ is not None and value is not None else None
        app_log.error("Uncaught exception %s", self._request_summary(), exc_info=exc_info)
