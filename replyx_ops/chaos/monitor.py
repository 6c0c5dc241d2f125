"""The soak's timeline: every half second, each gateway's ``/health`` (status, notification
lag, socket count) and memory, and how many of our sockets are connected.

A sample is the stack as a whole: ``status`` is 200 only when every gateway answered
200, ``lag_ms`` is the worst gateway's, ``gateway_sockets`` their sum. Memory is
kept per gateway process (a restart is a new pid), so the report can fit a slope to
each life (:func:`replyx_ops.chaos.report.rss_summary`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from replyx_ops.chaos.clients import Population
from replyx_ops.chaos.stack import Stack


@dataclass
class Sample:
    t: float
    status: int | None
    lag_ms: float | None
    gateway_sockets: int | None
    connected: int
    #: Gateway name → (pid, RSS bytes) of the process running then.
    gateways: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    @property
    def rss(self) -> int | None:
        values = [rss for _, rss in self.gateways.values() if rss is not None]
        return sum(values) if values else None


async def health(client: AsyncHTTPClient, url: str) -> tuple[int | None, dict[str, Any]]:
    """``(status, body)`` of one ``/health``; ``(None, {})`` when nothing answered."""
    try:
        response = await client.fetch(HTTPRequest(url, request_timeout=2), raise_error=False)
    except Exception:
        return None, {}
    if response.code == 599:
        return None, {}
    body: dict[str, Any] = {}
    if response.body:
        try:
            body = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            body = {}
    return response.code, body if isinstance(body, dict) else {}


async def sample_forever(stack: Stack, population: Population, t0: float,
                         samples: list[Sample]) -> None:
    """Append a :class:`Sample` to ``samples`` every half second until cancelled."""
    client = AsyncHTTPClient(force_instance=True)
    urls = stack.gateway_urls()
    try:
        while True:
            started = time.time()
            answers = await asyncio.gather(*(health(client, f"{u}/health")
                                             for u in urls.values()))
            statuses = [status for status, _ in answers]
            lags = [b["notification_lag_ms"] for _, b in answers
                    if isinstance(b.get("notification_lag_ms"), int | float)]
            sockets = [b["sockets"] for _, b in answers if isinstance(b.get("sockets"), int)]
            bad = [s for s in statuses if s != 200]
            pids = await asyncio.to_thread(stack.gateway_processes)
            samples.append(Sample(
                started - t0, bad[0] if bad else 200, max(lags) if lags else None,
                sum(sockets) if sockets else None, population.connected(),
                {name: (pid, stack.rss_bytes(pid)) for name, pid in sorted(pids.items())}))
            await asyncio.sleep(max(0.05, 0.5 - (time.time() - started)))
    finally:
        client.close()
