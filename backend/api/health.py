"""``GET /health``: 200 when the database answers, else 503.

``worker`` names the worker that answered: its PID for a caller on this host,
an opaque name through nginx (see :func:`backend.api.base.worker_id`).
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from backend.api.base import ApiHandler, is_database_unavailable, worker_id


class HealthHandler(ApiHandler):
    async def get(self) -> None:
        try:
            async with asyncio.timeout(3), self.db.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) or is_database_unavailable(exc)):
                raise
            self.write_json({"status": "unavailable", "database": "down"}, 503)
            return
        self.write_json({"status": "ok", "database": "up", "worker": worker_id(self.request)})
