"""gunicorn for the backend: our tornado worker (backend/worker.py), ``BACKEND_WORKERS`` (4).

Run as ``gunicorn -c conf/gunicorn.conf.py "backend.app:make_app()"``; supervisord does.
Each worker builds its own app, engine and pool after the fork.

Metrics: each worker counts its own requests; prometheus-client's multiprocess
mode keeps those counts in files under ``$REPLYX_DATA_DIR/metrics/backend`` so
that any worker's ``/metrics`` answers with the sum over all of them.
"""

import os
import shutil

from replyx import eventloop
from replyx.settings import Settings

_settings = Settings.from_environ()

bind = f"{_settings.host}:{_settings.backend_port}"
workers = _settings.backend_workers
worker_class = "backend.worker.Worker"
# Each worker binds its own SO_REUSEPORT socket and the kernel spreads new connections
# across them. With one shared socket, the first tornado worker to wake accepts a whole
# burst (it accepts up to 128 connections per wake-up) and the other three sit idle.
reuse_port = True
proc_name = "replyx-backend"
# Keep-alive connections from nginx; idle ones are closed after this many seconds.
keepalive = 75
graceful_timeout = 10
timeout = 30
# Tornado logs each request itself (with query strings redacted); gunicorn's access log
# would print raw URIs with their tokens, so it stays off.
accesslog = None
errorlog = "-"
loglevel = (_settings.log_level or "INFO").lower()

# prometheus-client picks its multiprocess value class when it is first imported, so the
# variable must be in the environment before any worker imports it: set it here, in the
# master, which the workers inherit it from. Only the backend runs in this mode; the
# gateway is one process and keeps its plain registry.
_metrics_dir = _settings.backend_metrics_dir
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)


def on_starting(server: object) -> None:
    # Files left by an earlier master would be summed into this one's counters.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)


def post_fork(server: object, worker: object) -> None:
    # Before the tornado worker makes its IOLoop (REPLYX_EVENT_LOOP).
    eventloop.install(_settings.event_loop)


def child_exit(server: object, worker: object) -> None:
    # A dead worker's live gauges (replyx_backend_workers) must stop counting; its counters
    # stay in the sum, as a Prometheus counter must never go down.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
