"""gunicorn's tornado worker, leaving as soon as the requests it began are answered.

gunicorn's own ``TornadoWorker`` notices an exit (SIGTERM, ``max_requests``, a new
parent) only on its 1 s heartbeat: one beat stops listening, the next stops the loop,
whatever is still running. So every backend stop took ~2 s with nothing to do, and a
request still being served at the second beat (a body still arriving, a commit) was cut
off. Invariant: once told to exit, this worker accepts no new connection, answers every
request it has begun (gunicorn's ``graceful_timeout`` still bounds it: the arbiter kills
a worker that takes longer), and stops within :data:`EXIT_POLL_SECONDS` of the last answer.

The count of requests begun and not yet answered is kept by the application
(:class:`InFlight`, in its settings) and moved by every handler: ``ApiHandler``
counts one from its construction to its ``on_finish`` (or its client's going away).
"""

from __future__ import annotations

from gunicorn.workers.gtornado import TornadoWorker
from tornado.ioloop import PeriodicCallback

#: How often an exiting worker looks whether its last request was answered.
EXIT_POLL_SECONDS = 0.05
#: The application setting that holds its :class:`InFlight`.
SETTING = "in_flight"


class InFlight:
    """Requests begun and not yet answered, in one process."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1


class Worker(TornadoWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    server_alive: bool
    alive: bool

    def run(self) -> None:
        self._exit_watch = PeriodicCallback(self._leave_when_answered, EXIT_POLL_SECONDS * 1000)
        self._exit_watch.start()
        super().run()

    def heartbeat(self) -> None:
        """gunicorn's heartbeat only handles the exit, which is ours now."""

    def _leave_when_answered(self) -> None:
        if self.alive:
            return
        if self.server_alive:
            self.server.stop()
            self.server_alive = False
        requests = getattr(self.wsgi, "settings", {}).get(SETTING)
        if isinstance(requests, InFlight) and requests.count > 0:
            return
        for callback in self.callbacks:
            callback.stop()
        self._exit_watch.stop()
        self.ioloop.stop()
