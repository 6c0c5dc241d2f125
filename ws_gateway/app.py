"""The gateway process: one LISTEN connection, one router, every socket.

:class:`Gateway` builds its parts once and hands them to the handlers through
``initialize`` kwargs. ``python -m ws_gateway`` runs one; tests start several
in-process on free ports.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry, ProcessCollector
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from replyx import logs, schema
from replyx.pg import libpq_url
from replyx.protocol import GATEWAY_APPLICATION, NOTIFY_CHANNEL, CloseCode
from replyx.settings import Settings
from ws_gateway.events import BadPayloadError, parse_event
from ws_gateway.handlers import debug
from ws_gateway.handlers.admin import AdminSocket
from ws_gateway.handlers.base import DialogSocket
from ws_gateway.handlers.site import SiteSocket
from ws_gateway.handlers.widget import WidgetSocket
from ws_gateway.limits import Limiter
from ws_gateway.listener import Listener
from ws_gateway.router import Router
from ws_gateway.metrics import Stats, StatsCollector
from ws_gateway.store import GatewayStore

log = logging.getLogger("ws_gateway")

ID = r"([^/]+)"
#: replyx.js and the demo admin and widget pages, served under /demo/.
STATIC_DIR = Path(__file__).resolve().parent / "static"
# Longest stretch of routing before held frames are flushed and other tasks get a turn.
BATCH_SECONDS = 0.01


class Gateway:
    #: The router to build; ``replyx bench`` swaps in its naive fan-out for comparison.
    router_class: type[Router] = Router

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.dsn = libpq_url(database_url)
        self.jwt_secret = settings.jwt_secret()
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_open_fds, …: memory per socket, fd headroom.
        ProcessCollector(registry=self.registry)
        self.stats = Stats(self.registry)
        self.limiter = Limiter(
            settings.max_sockets_per_ip, settings.client_msgs_per_second, settings.client_burst
        )
        self.stopping = False
        # Every open socket, from the first line of its open() (joined or not yet).
        self.sockets: set[DialogSocket] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        # While a batch of notifications is routed: the sockets holding frames to flush.
        self.corked: list[DialogSocket] | None = None
        self.pool: asyncpg.Pool | None = None
        self.server: HTTPServer | None = None
        self.port: int | None = None
        self._consumer: asyncio.Task[None] | None = None
        # Built in start(), where the event loop exists.
        self.store: GatewayStore
        self.router: Router
        self.listener: Listener

    # -- lifecycle -------------------------------------------------------------

    async def start(self, port: int | None = None, host: str | None = None) -> None:
        """Check the schema, open the pool and the LISTEN connection, then accept sockets.

        Started while Postgres is unreachable (restarted with it, or by supervisord
        during an outage), it waits for the server rather than exiting.
        """
        delay = 0.5
        while True:
            try:
                self.pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=10,
                    command_timeout=10,
                    timeout=5,
                    server_settings={"application_name": GATEWAY_APPLICATION},
                )
                break
            except Exception as exc:
                if not GatewayStore.is_unavailable(exc):
                    raise
                log.warning("database unreachable (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        try:
            revision = await self._revision()
            schema.ensure_at_head(revision)
        except BaseException:
            await self.pool.close()
            raise
        self.store = GatewayStore(self.pool)
        # Replays go out in chunks well under the per-socket buffer limit (see Router).
        replay_chunk = max(16 * 1024, self.settings.socket_buffer_limit // 4)
        self.router = self.router_class(self.store, self.stats, replay_chunk=replay_chunk)
        listen_url = self.settings.listen_database_url
        self.listener = Listener(
            libpq_url(listen_url) if listen_url else self.dsn,
            NOTIFY_CHANNEL,
            self.queue.put_nowait,
            self.router.resync_all,
            probe_interval=self.settings.listener_probe_interval,
            probe_timeout=self.settings.listener_probe_timeout,
            backoff_max=self.settings.listener_backoff_max,
        )
        self.registry.register(
            StatsCollector(
                self.stats, self.sockets_by_kind, lambda: self.listener.is_up,
                dialogs=lambda: len(self.router.channels),
                queue_length=self.queue.qsize,
                resyncing=lambda: self.router.resyncing,
                listener_reconnects=lambda: self.listener.reconnects,
            )
        )
        self._consumer = asyncio.ensure_future(self._consume())
        await self.listener.start()
        self.server = HTTPServer(
            self.make_app(), max_body_size=64 * 1024, idle_connection_timeout=120
        )
        self.port = self.settings.gateway_port if port is None else port
        sockets = tornado.netutil.bind_sockets(self.port, host or self.settings.host)
        self.port = sockets[0].getsockname()[1]
        self.server.add_sockets(sockets)
        log.info("gateway listening on %s:%d", host or self.settings.host, self.port)

    async def _revision(self) -> str | None:
        assert self.pool is not None
        try:
            return await self.pool.fetchval(schema.REVISION_SQL)
        except asyncpg.exceptions.UndefinedTableError:
            return None

    async def stop(self) -> None:
        """Close every socket with 1012 (clients resume with ``since``) and shut down."""
        if self.stopping:
            return
        self.stopping = True
        if self.server is not None:
            self.server.stop()
        socks = list(self.sockets)
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
        if hasattr(self, "listener"):
            await self.listener.stop()
        if self._consumer is not None:
            self._consumer.cancel()
        if hasattr(self, "router"):
            await self.router.close()
        if self.pool is not None:
            try:
                # Politely, but briefly: across a network partition each connection's close
                # would wait out command_timeout, and SIGTERM must exit within 10 s.
                await asyncio.wait_for(self.pool.close(), 2)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.pool.terminate()

    # -- notifications -----------------------------------------------------------

    async def _consume(self) -> None:
        """Route notifications in batches; each batch's frames leave in one write per socket.

        A batch is what is queued, up to ``BATCH_SECONDS`` of routing. Then the held
        frames are flushed and the loop yields, so a burst cannot starve the
        listener's probe, pings and handshakes for longer than one batch.
        """
        queue = self.queue
        while True:
            payload = await queue.get()
            deadline = time.monotonic() + BATCH_SECONDS
            self.corked = []
            try:
                await self._handle(payload)
                while not queue.empty() and time.monotonic() < deadline:
                    await self._handle(queue.get_nowait())
            finally:
                self._uncork()
            await asyncio.sleep(0)

    def _uncork(self) -> None:
        """Send what the batch held, one write per socket, and stop holding."""
        corked, self.corked = self.corked, None
        for sock in corked or ():
            try:
                sock.flush_frames()
            except Exception:
                log.exception("flushing frames to a socket of dialog %d failed", sock.dialog_id)
                sock.close(1011, "internal error, resume with since")

    async def _handle(self, payload: str) -> None:
        self.stats.notifications += 1
        try:
            event = parse_event(payload)
        except BadPayloadError as exc:
            self.stats.bad_notifications += 1
            log.warning("dropped malformed notification (%s): %r", exc, payload[:120])
            return
        try:
            if event.kind == "message_ref":
                # Reading the row awaits, and other tasks (replays, joins) run meanwhile: what
                # this batch holds goes out first, and their writes must not be held, since
                # their pacing waits on real writes.
                self._uncork()
                try:
                    await self.router.resolve_and_route(event)
                finally:
                    self.corked = []
            else:
                self.router.route(event)
        except Exception:
            log.exception("failed to route %s for dialog %d", event.kind, event.dialog_id)

    # -- views for the debug handlers ----------------------------------------------

    def sockets_by_kind(self) -> dict[str, int]:
        counts = dict.fromkeys(debug.KINDS, 0)
        for sub in self.router.subscribers():
            counts[sub.kind] += 1
        return counts

    def listener_state(self) -> dict[str, Any]:
        listener = self.listener
        return {
            "state": listener.state,
            "backend_pid": listener.backend_pid,
            "reconnects": listener.reconnects,
            "down_for_s": (
                round(time.monotonic() - listener.down_since, 3)
                if listener.down_since is not None else None
            ),
            "last_error": listener.last_error if listener.state != "up" else None,
            "queue": self.queue.qsize(),
            "resyncing_dialogs": self.router.resyncing,
        }

    def health(self) -> dict[str, Any]:
        listener = self.listener
        ok = listener.is_up and self.router.resyncing == 0 and not self.stopping
        lag = self.router.last_lag
        return {
            "status": "ok" if ok else "unavailable",
            "listener": listener.state,
            "resyncing_dialogs": self.router.resyncing,
            "notification_lag_ms": round(lag * 1000, 2) if lag is not None else None,
            "queue": self.queue.qsize(),
            "sockets": sum(len(s) for s in self.router.channels.values()),
        }

    # -- timers for sockets ----------------------------------------------------------

    def loop_call_later(self, delay: float, callback: Any) -> object:
        return IOLoop.current().call_later(delay, callback)

    def loop_cancel(self, handle: object) -> None:
        IOLoop.current().remove_timeout(handle)

    # -- the application -----------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        deps = {"gateway": self}
        settings = self.settings
        return tornado.web.Application(
            [
                (rf"/ws/dialogs/{ID}", AdminSocket, deps),
                (rf"/ws/widget/dialogs/{ID}", WidgetSocket, deps),
                (rf"/ws/site/dialogs/{ID}", SiteSocket, deps),
                (r"/health", debug.HealthHandler, deps),
                (r"/api/debug/websocket/status", debug.StatusHandler, deps),
                (r"/api/debug/websocket/sync", debug.SyncHandler, deps),
                (r"/metrics", debug.MetricsHandler, deps),
                (r"/ws/health", debug.HealthSocket, deps),
                (r"/demo", tornado.web.RedirectHandler, {"url": "/demo/"}),
                (r"/demo/(.*)", tornado.web.StaticFileHandler,
                 {"path": str(STATIC_DIR), "default_filename": "index.html"}),
            ],
            default_handler_class=debug.NotFoundHandler,
            default_handler_args=deps,
            log_function=logs.log_request,
            websocket_max_message_size=settings.max_inbound_frame,
            websocket_ping_interval=settings.ping_interval,
            websocket_ping_timeout=settings.ping_timeout,
            serve_traceback=False,
        )


async def serve(settings: Settings, database_url: str) -> None:
    """Run one gateway until SIGTERM or SIGINT."""

    gateway = Gateway(settings, database_url)
    await gateway.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("shutting down")
    await gateway.stop()
