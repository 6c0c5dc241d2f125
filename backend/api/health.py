"""``GET /health``: 200 when the database answers, else 503."""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import text

from backend.api.base import ApiHandler, is_database_unavailable


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
        self.write_json({"status": "ok", "database": "up", "worker": os.getpid()})
