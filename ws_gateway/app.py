"""The gateway process: one LISTEN connection, one router, every socket.

Invariant: :class:`Gateway` builds every part (store, router, listener,
consumer, metrics) in one place, :meth:`Gateway.start`, once the pool is open
and the schema checked, into one :class:`~ws_gateway.parts.Parts` handed to the
handlers through ``initialize`` kwargs; before that nothing exists to be half
used. ``python -m ws_gateway`` runs one; tests start several in-process on
free ports.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry, ProcessCollector
from tornado.httpserver import HTTPServer

from replyx import logs, schema
from replyx.backoff import Backoff
from replyx.gateways import gateway_name, listen_port
from replyx.pg import libpq_url
from replyx.protocol import GATEWAY_APPLICATION, NOTIFY_CHANNEL, CloseCode, SocketKind
from replyx.settings import Settings
from ws_gateway import gctune
from ws_gateway.consumer import Consumer, WriteBatch
from ws_gateway.handlers.admin import AdminSocket, AdminStream
from ws_gateway.handlers.debug import StatusHandler, SyncHandler
from ws_gateway.handlers.demo import DemoFiles, DemoRedirect
from ws_gateway.handlers.health import HealthHandler, HealthSocket, health
from ws_gateway.handlers.http import NotFoundHandler
from ws_gateway.handlers.inbox import InboxSocket, InboxStream
from ws_gateway.handlers.metrics import MetricsHandler
from ws_gateway.handlers.site import SiteSocket, SiteStream
from ws_gateway.handlers.widget import WidgetSocket, WidgetStream
from ws_gateway.limits import ByteBudget, Limiter
from ws_gateway.listener import Listener
from ws_gateway.metrics import ConnectionsCollector, MetricsCollector, Stats, count_connections
from ws_gateway.parts import OpenSocket, Parts
from ws_gateway.presence import Presence
from ws_gateway.router import Router
from ws_gateway.sse import Streams
from ws_gateway.store import GatewayStore, PresenceStore
from ws_gateway.workspace import Workspace

log = logging.getLogger("ws_gateway")

ID = r"([^/]+)"
#: replyx.js and the demo admin and widget pages, served under /demo/.
STATIC_DIR = Path(__file__).resolve().parent / "static"


class RouterFactory(Protocol):
    """Builds the router; ``replyx bench`` passes its naive fan-out for comparison."""

    def __call__(
        self, store: GatewayStore, stats: Stats, *, replay_chunk: int, page_bytes: int,
        budget: ByteBudget,
    ) -> Router: ...


class Gateway:
    def __init__(
        self, settings: Settings, database_url: str, *, router_factory: RouterFactory = Router
    ) -> None:
        self.settings = settings
        self.dsn = libpq_url(database_url)
        self.router_factory = router_factory
        #: Every part, once :meth:`start` has built them all; None before.
        self.parts: Parts | None = None
        self.server: HTTPServer | None = None
        self.port: int | None = None
        self._stopping = asyncio.Event()
        #: Seconds between the keep-alive comments of an idle SSE stream (tests shorten it).
        self.sse_keep_alive = 10.0

    # -- lifecycle -------------------------------------------------------------

    async def start(self, port: int | None = None, host: str | None = None) -> None:
        """Check the schema, open the pool and the LISTEN connection, then accept sockets.

        Started while Postgres is unreachable (restarted with it, or by supervisord
        during an outage), it waits for the server rather than exiting.
        """
        pool = await self._open_pool()
        try:
            schema.ensure_at_head(await self._revision(pool))
            self.parts = parts = self._build(pool)
        except BaseException:
            await pool.close()
            raise
        parts.stats.gc.install()
        parts.consumer.start()
        await parts.listener.start()
        # After LISTEN is in place: a total published after the presence read is not missed.
        await parts.presence.start()
        self.server = HTTPServer(
            self.make_app(parts), max_body_size=64 * 1024, idle_connection_timeout=120
        )
        self.port = listen_port(self.settings) if port is None else port
        sockets = tornado.netutil.bind_sockets(self.port, host or self.settings.host)
        self.port = sockets[0].getsockname()[1]
        self.server.add_sockets(sockets)
        log.info("%s listening on %s:%d", gateway_name(self.settings), host or self.settings.host,
                 self.port)

    async def _open_pool(self) -> asyncpg.Pool:
        backoff = Backoff(initial=0.5, maximum=10.0)
        while True:
            try:
                return await asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=10,
                    command_timeout=10,
                    timeout=5,
                    server_settings={"application_name": GATEWAY_APPLICATION},
                    # A separate LISTEN URL means DATABASE_URL is a transaction pooler
                    # (pgbouncer), where a named prepared statement may land on another
                    # server connection: asyncpg then uses unnamed ones only.
                    statement_cache_size=0 if self.settings.listen_database_url else 100,
                )
            except Exception as exc:
                if not GatewayStore.is_unavailable(exc):
                    raise
                delay = backoff.next()
                log.warning("database unreachable (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)

    @staticmethod
    async def _revision(pool: asyncpg.Pool) -> str | None:
        try:
            revision: str | None = await pool.fetchval(schema.REVISION_SQL)
        except asyncpg.exceptions.UndefinedTableError:
            return None
        return revision

    def _build(self, pool: asyncpg.Pool) -> Parts:
        """Every part of the gateway, wired together; nothing is started yet."""
        settings = self.settings
        registry = CollectorRegistry()
        # process_resident_memory_bytes, process_open_fds, …: memory per socket, fd headroom.
        ProcessCollector(registry=registry)
        stats = Stats()
        store = GatewayStore(pool)
        # Replays go out in chunks well under the per-socket buffer limit (see Router).
        replay_chunk = max(16 * 1024, settings.socket_buffer_limit // 4)
        router = self.router_factory(
            store, stats, replay_chunk=replay_chunk, page_bytes=settings.replay_page_bytes,
            budget=ByteBudget(settings.replay_memory),
        )
        presence = Presence(PresenceStore(pool))
        workspace = Workspace(store, presence)
        consumer = Consumer(router, workspace, presence, stats, WriteBatch())
        listen_url = settings.listen_database_url
        listener = Listener(
            libpq_url(listen_url) if listen_url else self.dsn,
            NOTIFY_CHANNEL,
            consumer.put,
            lambda: self._resync_all(router, workspace, presence),
            probe_interval=settings.listener_probe_interval,
            probe_timeout=settings.listener_probe_timeout,
            backoff_max=settings.listener_backoff_max,
        )
        registry.register(
            MetricsCollector(
                stats,
                gateway=gateway_name(settings),
                sockets_by_kind=lambda: router.count_by_kind() | {
                    SocketKind.INBOX.value: workspace.count()},
                listener_up=lambda: listener.is_up,
                listener_reconnects=lambda: listener.reconnects,
                dialogs=lambda: len(router.dialogs),
                queue_length=consumer.queue.qsize,
                resyncing=lambda: router.resyncing,
                presence=presence.gauges,
            )
        )
        sockets: set[OpenSocket] = set()
        registry.register(ConnectionsCollector(lambda: count_connections(sockets)))
        limiter = Limiter(
            settings.max_sockets_per_ip, settings.client_msgs_per_second, settings.client_burst,
            handshakes_per_second=settings.handshake_rate,
            handshake_burst=settings.handshake_burst,
            address_frames_per_second=settings.address_frame_rate,
            address_frame_burst=settings.address_frame_burst,
        )
        return Parts(
            settings=settings, jwt_secret=settings.jwt_secret(), store=store, router=router,
            listener=listener, consumer=consumer, limiter=limiter, stats=stats,
            registry=registry, workspace=workspace, presence=presence,
            streams=Streams(self.sse_keep_alive), sockets=sockets,
            stopping=self._stopping,
        )

    @staticmethod
    def _resync_all(router: Router, workspace: Workspace, presence: Presence) -> None:
        """The listener is (back) up: whatever was missed is re-read from the database."""
        router.resync_all()
        workspace.resync_all()
        if presence.last_heartbeat is not None:  # not the first LISTEN: start() reads it
            router.spawn(presence.reload())

    async def stop(self) -> None:
        """Close every socket with 1012 (clients resume with ``since``) and shut down."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.server is not None:
            self.server.stop()
        parts = self.parts
        socks = list(parts.sockets) if parts is not None else []
        for sock in socks:
            sock.close(CloseCode.RESTARTING, "gateway restarting, resume with since")
        log.info("closing %d socket(s) with %d", len(socks), CloseCode.RESTARTING)
        # Give queued frames and the close frame time to leave, and clients time to answer.
        deadline = time.monotonic() + self.settings.shutdown_grace
        while any(not sock.is_finished for sock in socks):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if self.server is not None:
            await self.server.close_all_connections()
        if parts is None:
            return
        parts.stats.gc.uninstall()
        await parts.presence.stop()
        await parts.listener.stop()
        await parts.consumer.stop()
        await parts.router.close()
        await parts.workspace.close()
        parts.streams.close()
        pool = parts.store.pool
        try:
            # Politely, but briefly: across a network partition each connection's close
            # would wait out command_timeout, and SIGTERM must exit within 10 s.
            await asyncio.wait_for(pool.close(), 2)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    # -- the parts, for tests and tools ----------------------------------------------

    @property
    def started(self) -> Parts:
        if self.parts is None:
            raise RuntimeError("the gateway is not started")
        return self.parts

    @property
    def store(self) -> GatewayStore:
        return self.started.store

    @property
    def router(self) -> Router:
        return self.started.router

    @property
    def listener(self) -> Listener:
        return self.started.listener

    @property
    def stats(self) -> Stats:
        return self.started.stats

    @property
    def limiter(self) -> Limiter:
        return self.started.limiter

    @property
    def workspace(self) -> Workspace:
        return self.started.workspace

    @property
    def presence(self) -> Presence:
        return self.started.presence

    @property
    def sockets(self) -> set[OpenSocket]:
        return self.started.sockets

    def health(self) -> dict[str, Any]:
        return health(self.started)

    # -- the application -----------------------------------------------------------

    def make_app(self, parts: Parts) -> tornado.web.Application:
        deps = {"parts": parts}
        settings = self.settings
        return tornado.web.Application(
            [
                (rf"/ws/dialogs/{ID}", AdminSocket, deps),
                (rf"/ws/widget/dialogs/{ID}", WidgetSocket, deps),
                (rf"/ws/site/dialogs/{ID}", SiteSocket, deps),
                (r"/ws/inbox", InboxSocket, deps),
                # The same sessions over server-sent events, for networks that block sockets.
                (rf"/sse/dialogs/{ID}", AdminStream, deps),
                (rf"/sse/widget/dialogs/{ID}", WidgetStream, deps),
                (rf"/sse/site/dialogs/{ID}", SiteStream, deps),
                (r"/sse/inbox", InboxStream, deps),
                (r"/health", HealthHandler, deps),
                (r"/api/debug/websocket/status", StatusHandler, deps),
                (r"/api/debug/websocket/sync", SyncHandler, deps),
                (r"/metrics", MetricsHandler, deps),
                (r"/ws/health", HealthSocket, deps),
                (r"/demo", DemoRedirect),
                (r"/demo/(.*)", DemoFiles,
                 {"path": str(STATIC_DIR), "default_filename": "index.html", "parts": parts}),
            ],
            default_handler_class=NotFoundHandler,
            default_handler_args=deps,
            log_function=logs.log_request,
            websocket_max_message_size=settings.max_inbound_frame,
            websocket_ping_interval=settings.ping_interval,
            websocket_ping_timeout=settings.ping_timeout,
            serve_traceback=False,
        )


async def serve(
    settings: Settings, database_url: str, *, router_factory: RouterFactory = Router
) -> None:
    """Run one gateway until SIGTERM or SIGINT."""

    gateway = Gateway(settings, database_url, router_factory=router_factory)
    await gateway.start()
    gctune.tune()  # this process is the gateway's alone (see ws_gateway/gctune.py)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("shutting down")
    await gateway.stop()
