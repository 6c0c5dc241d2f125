"""The widget's origin rule, shared by ``POST /api/widget/dialogs`` and ``/ws/widget/…``.

An origin is ``scheme://host[:port]``. Matching is exact on the normalised
form (lower case, default port dropped): no suffix, prefix or substring
matching, so ``https://shop.example.evil.com`` never matches ``https://shop.example``.

When the widget runs inside the product's own iframe the browser's ``Origin``
is the widget host (``REPLYX_WIDGET_ORIGIN``) and ``parent_origin`` names the
embedding site, which is then what must be allowed. In every other case
``parent_origin`` is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 1123 host names and IPv4 literals; IPv6 literals in brackets.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_IPV6_RE = re.compile(r"^\[[0-9a-f:.]+\]$")


def normalize_origin(value: str | None, *, default_scheme: str | None = None) -> str | None:
    """The canonical ``scheme://host[:port]`` of ``value``, or ``None`` if it is not one.

    ``default_scheme`` lets an operator write a bare host name (``shop.example``)
    when registering a domain; browsers always send the scheme.
    """
    if not value or len(value) > 300:
        return None
    value = value.strip()
    if default_scheme and "://" not in value:
        value = f"{default_scheme}://{value}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = (parts.hostname or "").lower()
    if "[" in parts.netloc:
        host = f"[{host}]"
        if not _IPV6_RE.match(host):
            return None
    elif not _HOST_RE.match(host):
        return None
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def effective_origin(
    origin: str | None, parent_origin: str | None, widget_origin: str | None
) -> str | None:
    """The origin the rule checks: ``parent_origin`` inside our own iframe, else ``Origin``."""
    normalized = normalize_origin(origin)
    if normalized is not None and widget_origin is not None and normalized == widget_origin:
        return normalize_origin(parent_origin)
    return normalized


def origin_allowed(
    origin: str | None,
    parent_origin: str | None,
    domains: Iterable[str],
    widget_origin: str | None,
) -> bool:
    candidate = effective_origin(origin, parent_origin, widget_origin)
    return candidate is not None and candidate in set(domains)
