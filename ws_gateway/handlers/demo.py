"""``/demo/``: the demo admin and widget pages, with a Content-Security-Policy each.

Invariants: a redirect here never names a host (the ``Host`` header is the client's to
choose); every HTML page gets a CSP whose scripts are ``'self'`` plus the hashes of the
page's own inline scripts (computed from the file served, so editing a page keeps it
working), and is framed only where it is meant to be:

* ``widget.html?assistant_id=A`` is embedded by customer sites: ``frame-ancestors`` lists
  that assistant's domains (the same list the widget's origin rule checks), and
  ``'self'``; no ``X-Frame-Options``, which cannot name several origins.
* every other page: ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache

import tornado.web

from replyx.protocol import positive_id
from ws_gateway.parts import Parts

_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script>", re.S | re.I)
#: What a frame-ancestors source may be: an origin as the backend stores it, nothing else.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")
#: The widget page is the one customer sites frame.
FRAMED_PAGE = "widget.html"


@lru_cache(maxsize=32)
def _script_sources(html: bytes) -> str:
    hashes = (base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
              for m in _INLINE_SCRIPT.finditer(html))
    return " ".join(["'self'", *(f"'sha256-{h}'" for h in hashes)])


def content_security_policy(html: bytes, frame_ancestors: str) -> str:
    return "; ".join([
        "default-src 'self'",
        f"script-src {_script_sources(html)}",
        "style-src 'self'",
        "img-src 'self' data:",
        # The pages talk to the backend and the gateway, which may be other origins.
        "connect-src 'self' http: https: ws: wss:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        f"frame-ancestors {frame_ancestors}",
    ])


class DemoRedirect(tornado.web.RequestHandler):
    """``/demo`` → ``/demo/``, relative: never to the host the request names."""

    def get(self) -> None:
        self.set_status(301)
        self.set_header("Location", "/demo/")

    head = get


class DemoFiles(tornado.web.StaticFileHandler):
    def initialize(  # type: ignore[override]
        self, path: str, default_filename: str | None = None, parts: Parts | None = None
    ) -> None:
        super().initialize(path, default_filename)
        self.parts = parts
        self._frame_ancestors = "'none'"

    async def prepare(self) -> None:
        if self.parts is None or not self.request.path.endswith("/" + FRAMED_PAGE):
            return
        assistant_id = positive_id(self.get_query_argument("assistant_id", "") or "")
        domains = (await self.parts.store.assistant_domains(assistant_id)
                   if assistant_id is not None else [])
        allowed = [d for d in domains if _ORIGIN.fullmatch(d)]
        self._frame_ancestors = " ".join(["'self'", *allowed])

    def set_extra_headers(self, path: str) -> None:
        absolute = self.absolute_path
        if absolute is None or not absolute.endswith(".html"):
            return
        with open(absolute, "rb") as page:
            html = page.read()
        self.set_header("Content-Security-Policy",
                        content_security_policy(html, self._frame_ancestors))
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        if self._frame_ancestors == "'none'":
            self.set_header("X-Frame-Options", "DENY")
