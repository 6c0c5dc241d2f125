"""The gateway's metrics: plain integers on the hot path, Prometheus families on scrape.

Invariant: nothing on the routing path touches prometheus-client. Incrementing
a prometheus-client counter takes a lock; at hundreds of thousands of frames
per second that shows in a profile. The router bumps plain attributes of
:class:`Stats` instead (histograms are :class:`PlainHistogram` counts), and
:class:`MetricsCollector` turns them into Prometheus metrics only when
``/metrics`` is read.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from replyx.protocol import REFUSAL_CODES, SocketKind
from replyx.timing import GATEWAY_STAGE_METRIC, STAGE_BUCKETS, GatewayStage

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PlainHistogram:
    """A histogram kept as plain counts per bucket, optionally one per value of one label.

    An observation is a ``bisect`` and two additions, no lock (prometheus-client's
    ``Histogram.observe`` takes one): cheap enough for every message. Exported as a
    Prometheus histogram family when ``/metrics`` is read.
    """

    def __init__(self, name: str, doc: str, bounds: Iterable[float], *,
                 label: str | None = None, values: Iterable[str] = ("",)) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = tuple(bounds)
        self.counts = {value: [0] * (len(self.bounds) + 1) for value in values}
        self.sums = dict.fromkeys(self.counts, 0.0)

    def observe(self, seconds: float, value: str = "") -> None:
        self.counts[value][bisect_left(self.bounds, seconds)] += 1
        self.sums[value] += seconds

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc,
                                       labels=[self.label] if self.label else None)
        uppers = [repr(bound) for bound in self.bounds] + ["+Inf"]
        for value, counts in self.counts.items():
            cumulative, buckets = 0, []
            for upper, count in zip(uppers, counts, strict=True):
                cumulative += count
                buckets.append((upper, cumulative))
            family.add_metric([value] if self.label else [], buckets, self.sums[value])
        return family


GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GcPauses:
    """How long Python's garbage collector stops the event loop, by generation.

    A full collection walks every object of the process — with thousands of sockets,
    enough to hold every frame back for a while. ``gc.callbacks`` times each one.
    """

    def __init__(self) -> None:
        self.pauses = PlainHistogram(
            "replyx_gc_pause_seconds",
            "Garbage collections of the gateway process (the event loop stops meanwhile)",
            GC_BUCKETS, label="generation", values=("0", "1", "2"))
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.observe(time.perf_counter() - self._started, str(info["generation"]))


class Stats:
    def __init__(self) -> None:
        self.gc = GcPauses()
        #: Where a message's time goes in the gateway (:mod:`replyx.timing`).
        self.stages = PlainHistogram(
            GATEWAY_STAGE_METRIC,
            "Where a message's time goes in the gateway: notify (created_at to NOTIFY read),"
            " queue, parse, deliver (parsed to frames handed to the kernel)",
            STAGE_BUCKETS, label="stage", values=list(GatewayStage),
        )
        self.frames_sent = 0
        self.frames_replayed = 0
        self.messages_routed = 0
        self.notifications = 0
        self.bad_notifications = 0
        self.slow_consumers_dropped = 0
        self.refused: Counter[str] = Counter()
        self.lag = PlainHistogram(
            "replyx_notification_lag_seconds",
            "Time from a message's creation in the database to its routing by the gateway",
            LAG_BUCKETS,
        )
        self.last_lag: float | None = None  # of the last message timed, for /health

    def observe_lag(self, seconds: float) -> None:
        self.last_lag = seconds
        self.lag.observe(max(seconds, 0.0))


TRANSPORTS = ("ws", "sse")


class Connection(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def transport_name(self) -> str: ...


def count_connections(sessions: Iterable[Connection]) -> dict[tuple[str, str], int]:
    """Open sessions by (kind, transport), every pair present (from 0)."""
    counts = {(kind.value, transport): 0 for kind in SocketKind for transport in TRANSPORTS}
    for session in sessions:
        counts[(str(session.kind), session.transport_name)] += 1
    return counts


class ConnectionsCollector(Collector):
    """``replyx_connections{kind,transport}``: sessions by transport (WebSocket or SSE)."""

    def __init__(self, read: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "replyx_connections",
            "Open client connections (authorising ones included) by kind and transport",
            labels=["kind", "transport"],
        )
        for (kind, transport), count in sorted(self.read().items()):
            family.add_metric([kind, transport], count)
        yield family


class MetricsCollector(Collector):
    """Exports :class:`Stats` and live gauges read from the gateway's parts on each scrape."""

    def __init__(
        self,
        stats: Stats,
        *,
        gateway: str = "gateway",
        sockets_by_kind: Callable[[], dict[str, int]],
        listener_up: Callable[[], bool],
        listener_reconnects: Callable[[], int],
        dialogs: Callable[[], int],
        queue_length: Callable[[], int],
        resyncing: Callable[[], int],
        presence: Callable[[], dict[str, float]],
    ) -> None:
        self.stats = stats
        self.gateway = gateway
        self.sockets_by_kind = sockets_by_kind
        self.listener_up = listener_up
        self.listener_reconnects = listener_reconnects
        self.gauges = [
            ("replyx_dialogs_watched", "Dialogs with at least one open socket", dialogs),
            ("replyx_notification_queue_length",
             "Notifications received and not yet routed", queue_length),
            ("replyx_resyncing_dialogs",
             "Dialogs catching up from the database after a listener reconnect", resyncing),
            ("replyx_presence_operators_online",
             "Operators online, summed over assistants (every gateway)",
             lambda: presence()["operators"]),
            ("replyx_presence_visitors_online",
             "Dialogs whose visitor is on the page (every gateway)",
             lambda: presence()["visitors"]),
            ("replyx_presence_heartbeat_age_seconds",
             "Seconds since this gateway last renewed its presence lease",
             lambda: presence()["heartbeat_age"]),
        ]

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        # Which of several gateways answered: join on it (`* on() group_left(gateway)`) or
        # add it as a target label; every gateway is scraped on its own port.
        info = GaugeMetricFamily("replyx_gateway_info", "This gateway's name (REPLYX_GATEWAY_NAME)",
                                 labels=["gateway"])
        info.add_metric([self.gateway], 1)
        yield info
        sockets = GaugeMetricFamily(
            "replyx_sockets", "Open client connections (WebSocket and SSE) by kind",
            labels=["kind"]
        )
        for kind, count in sorted(self.sockets_by_kind().items()):
            sockets.add_metric([kind], count)
        yield sockets
        yield GaugeMetricFamily(
            "replyx_listener_up", "1 while the LISTEN connection is up",
            value=int(self.listener_up()),
        )
        for name, doc, read in self.gauges:
            yield GaugeMetricFamily(name, doc, value=read())
        simple = [
            ("replyx_frames_sent", "Frames written to sockets by live fan-out", s.frames_sent),
            ("replyx_frames_replayed", "Frames written while replaying from the database",
             s.frames_replayed),
            ("replyx_messages_routed", "Message notifications routed", s.messages_routed),
            ("replyx_notifications", "Notifications received on the LISTEN connection",
             s.notifications),
            ("replyx_bad_notifications", "Malformed or unknown notifications dropped",
             s.bad_notifications),
            ("replyx_slow_consumers_dropped", "Sockets closed with 4008 (buffer overflow)",
             s.slow_consumers_dropped),
            ("replyx_listener_reconnects", "Times the LISTEN connection was re-established",
             self.listener_reconnects()),
        ]
        for name, doc, value in simple:
            yield CounterMetricFamily(name, doc, value=value)
        yield s.lag.family()
        yield s.stages.family()
        yield s.gc.pauses.family()
        refused = CounterMetricFamily(
            "replyx_refused_handshakes", "WebSocket connections refused, by close code",
            labels=["code"],
        )
        # Every refusal code exported from 0, so that rate() and alerts work from the start.
        counts = dict.fromkeys(map(str, REFUSAL_CODES), 0) | s.refused
        for code, count in sorted(counts.items()):
            refused.add_metric([code], count)
        yield refused
