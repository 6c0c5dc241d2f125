"""The backend application, as gunicorn loads it: ``backend.app:make_app()``.

gunicorn's tornado worker imports this in each worker after the fork, so the
engine (and its pool) belongs to one worker's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.web

from backend import metrics
from backend.api import auth, operator, site, widget
from backend.api.base import NotFoundHandler
from backend.api.health import HealthHandler
from backend.api.metrics import MetricsHandler
from backend.api.openapi import OpenApiHandler
from backend.db import Database
from backend.worker import SETTING as IN_FLIGHT
from backend.worker import InFlight
from replyx import logs, schema
from replyx.pg import redact_url, resolve_database_url
from replyx.settings import Settings

log = logging.getLogger("backend")

ID = r"([^/]+)"

#: Every route of the API; docs/openapi.json describes exactly these (tests/test_openapi.py).
ROUTES: list[tuple[str, type[tornado.web.RequestHandler]]] = [
    (r"/health", HealthHandler),
    (r"/metrics", MetricsHandler),
    (r"/api/openapi.json", OpenApiHandler),
    (r"/api/auth/login", auth.LoginHandler),
    (r"/api/dialogs", operator.DialogsHandler),
    (rf"/api/dialogs/{ID}/messages", operator.MessagesHandler),
    (rf"/api/dialogs/{ID}/typing", operator.TypingHandler),
    (rf"/api/dialogs/{ID}/read", operator.ReadHandler),
    (r"/api/site/dialogs", site.SiteDialogsHandler),
    (rf"/api/site/dialogs/{ID}/messages", site.SiteMessagesHandler),
    (rf"/api/site/dialogs/{ID}/typing", site.SiteTypingHandler),
    (r"/api/widget/dialogs", widget.WidgetDialogsHandler),
    (rf"/api/widget/dialogs/{ID}/messages", widget.WidgetMessagesHandler),
    (rf"/api/widget/dialogs/{ID}/typing", widget.WidgetTypingHandler),
    (rf"/api/widget/dialogs/{ID}/read", widget.WidgetReadHandler),
]


def make_app(
    settings: Settings | None = None, *, database_url: str | None = None
) -> tornado.web.Application:
    """Build the API; refuses to start unless the schema is at the newest migration."""
    settings = settings or Settings.from_environ()
    logs.setup_logging(settings.log_level or "INFO")
    url = database_url or resolve_database_url(settings.database_url, settings.data_dir)
    # Inside gunicorn's 30 s boot timeout: a worker respawned during a Postgres restart waits.
    schema.ensure_at_head(schema.wait_for_revision(url, timeout=20))
    log.info("backend worker ready, database %s", redact_url(url))
    metrics.worker_started()
    return build_application(
        settings, Database(url, pooler=settings.listen_database_url is not None),
        settings.jwt_secret(), metrics_dir=settings.backend_metrics_dir
    )


def build_application(
    settings: Settings, db: Database, jwt_secret: bytes, *, metrics_dir: Path | None = None
) -> tornado.web.Application:
    """The API on ``db``; ``metrics_dir``: the workers' shared metrics (gunicorn only)."""
    deps = {"db": db, "config": settings, "jwt_secret": jwt_secret, "metrics_dir": metrics_dir}
    extra: dict[str, Any] = {IN_FLIGHT: InFlight()}  # for backend/worker.py
    return tornado.web.Application(
        [(pattern, handler, deps) for pattern, handler in ROUTES],
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=_log_and_count(ROUTES),
        serve_traceback=False,
        compress_response=False,
        **extra,
    )


def _log_and_count(
    routes: list[tuple[str, type[tornado.web.RequestHandler]]],
) -> Callable[[tornado.web.RequestHandler], None]:
    """Tornado's ``log_function``: the redacted access line, then the request metrics.

    Requests are labelled with their route pattern (``/api/dialogs/{id}/messages``),
    never the raw path, so the number of label values stays bounded.
    """
    route_of = {handler: pattern.replace(ID, "{id}") for pattern, handler in routes}

    def log_function(handler: tornado.web.RequestHandler) -> None:
        logs.log_request(handler)
        metrics.observe(handler, route_of.get(type(handler), metrics.UNMATCHED))

    return log_function
