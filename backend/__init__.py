"""The HTTP API: a Tornado app served by gunicorn's tornado worker (``BACKEND_WORKERS`` of them)."""
