"""gunicorn for the backend: the tornado worker, 4 workers (``BACKEND_WORKERS`` overrides).

Run as ``gunicorn -c conf/gunicorn.conf.py "backend.app:make_app()"``; supervisord does.
Each worker builds its own app, engine and pool after the fork.
"""

import os

bind = f"{os.environ.get('REPLYX_HOST', '127.0.0.1')}:{os.environ.get('BACKEND_PORT', '8000')}"
workers = int(os.environ.get("BACKEND_WORKERS", "4"))
worker_class = "tornado"
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
loglevel = os.environ.get("REPLYX_LOG_LEVEL", "info").lower()
