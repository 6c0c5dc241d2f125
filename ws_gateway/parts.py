"""The parts of a running gateway, built once and handed to every handler.

Invariant: a :class:`Parts` exists only whole. :meth:`ws_gateway.app.Gateway.start`
builds every part (store, router, listener, consumer, metrics) in one place,
then hands this one object to the handlers through ``initialize`` kwargs; no
handler imports the gateway, and none reaches past these parts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry

from replyx.settings import Settings
from ws_gateway.consumer import Consumer, WriteBatch
from ws_gateway.limits import Limiter
from ws_gateway.listener import Listener
from ws_gateway.metrics import Stats
from ws_gateway.presence import Presence
from ws_gateway.router import Router
from ws_gateway.sse import Streams
from ws_gateway.store import GatewayStore
from ws_gateway.workspace import Workspace


class OpenSocket(Protocol):
    """Any session (socket or stream) from its admission, joined or not yet."""

    @property
    def kind(self) -> str: ...

    @property
    def transport_name(self) -> str: ...

    @property
    def is_finished(self) -> bool: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


@dataclass(frozen=True, slots=True, eq=False)
class Parts:
    settings: Settings
    jwt_secret: bytes
    store: GatewayStore
    router: Router
    listener: Listener
    consumer: Consumer
    limiter: Limiter
    stats: Stats
    registry: CollectorRegistry
    workspace: Workspace
    presence: Presence
    #: What every SSE stream shares: the rendering of each event, the keep-alive ticker.
    streams: Streams
    #: Every open socket, so that a shutdown can close even those still authorising.
    sockets: set[OpenSocket]
    #: Set once the gateway is stopping: new sockets get 1012, ``/health`` says unavailable.
    stopping: asyncio.Event

    @property
    def batch(self) -> WriteBatch:
        return self.consumer.batch
