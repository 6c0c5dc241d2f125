"""The HTTP API: a Tornado application served by gunicorn's tornado worker (4 workers)."""
