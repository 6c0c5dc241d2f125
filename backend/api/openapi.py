"""``GET /api/openapi.json``: the OpenAPI 3.1 description of this API, kept in ``docs/``.

The document is written by hand next to the code (``docs/openapi.json``) and
tests hold the two together: every route of ``backend/app.py`` is described and
nothing else is, and schemathesis checks the live API against it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from backend.api.base import ApiHandler

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


@cache
def document() -> bytes:
    """The document's bytes, read once per worker (on the first request, not at import)."""
    return DOCUMENT.read_bytes()


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        # Public and the same for everyone: caches may keep it, unlike every other answer.
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(document())
