"""Request metrics of the backend, summed over its gunicorn workers.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set (``conf/gunicorn.conf.py``)
and every worker writes its values to files there; ``/metrics`` answers, from
whichever worker gets the request, with prometheus-client's
:class:`MultiProcessCollector` merging all of them. In a single process (the
in-process test apps) the same metrics are read from :data:`REGISTRY`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from replyx.timing import BACKEND_STAGE_METRIC, STAGE_BUCKETS, BackendStage

if TYPE_CHECKING:
    from tornado.web import RequestHandler

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "replyx_backend_requests",
    "HTTP requests answered by the backend, by method, route and status code",
    ["method", "route", "code"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "replyx_backend_request_duration_seconds",
    "Time from a request's arrival to its response, by method and route",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
# livesum: each live worker adds 1; gunicorn's child_exit hook removes a dead worker's share.
WORKERS = Gauge(
    "replyx_backend_workers",
    "Backend worker processes serving requests",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)

MESSAGE_STAGES = Histogram(
    BACKEND_STAGE_METRIC,
    "Where a posted message's time goes in the backend: handler (request parsed to INSERT"
    " sent), commit (INSERT handed to the database to committed, a shared commit's wait"
    " included)",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
COMMIT_WRITES = Histogram(
    "replyx_backend_commit_writes",
    "Messages and typing events per committed transaction (backend.group_commit: more than"
    " one when they arrive while the worker's commits are in flight)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)

#: The route label of requests no route matched (bounded label values, whatever the path).
UNMATCHED = "other"


def worker_started() -> None:
    WORKERS.set(1)


def observe(handler: RequestHandler, route: str) -> None:
    request = handler.request
    method = request.method or "-"
    REQUESTS.labels(method, route, str(handler.get_status())).inc()
    DURATION.labels(method, route).observe(request.request_time())


def observe_message(handler_seconds: float, commit_seconds: float) -> None:
    """The stages of one posted message (see :mod:`replyx.timing`)."""
    MESSAGE_STAGES.labels(BackendStage.HANDLER.value).observe(handler_seconds)
    MESSAGE_STAGES.labels(BackendStage.COMMIT.value).observe(commit_seconds)


def observe_commit(writes: int) -> None:
    """One committed transaction of the hot writes, holding ``writes`` of them."""
    COMMIT_WRITES.observe(writes)


def exposition(multiprocess_dir: Path | None) -> bytes:
    """Prometheus text summed over every worker's files in ``multiprocess_dir`` (gunicorn),
    or of this process alone (``None``: the in-process test apps)."""
    if multiprocess_dir is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    # prometheus-client (0.26) leaves MultiProcessCollector.__init__ unannotated.
    multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
        registry, path=str(multiprocess_dir))
    return generate_latest(registry)
