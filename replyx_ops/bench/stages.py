"""Per-stage timing in ``replyx bench``: the servers' own stage histograms, read off ``/metrics``.

The backend and the gateway time each message's stages (:mod:`replyx.timing`)
into Prometheus histograms. The bench scrapes both before and after a measured
phase and reads each stage's p50 and p99 off the difference, so the figures
cover exactly that phase. Invariant: a quantile is read by linear
interpolation inside its bucket, never beyond the last finite bound, and a
stage with no observation in the phase has ``None`` for every figure.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from replyx.timing import BACKEND_STAGE_METRIC, GATEWAY_STAGE_METRIC, BackendStage, GatewayStage

#: stage → cumulative count per upper bound (``inf`` last).
Buckets = dict[str, list[tuple[float, float]]]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        text: str = response.read().decode()
        return text


def stage_buckets(text: str, metric: str, label: str = "stage") -> Buckets:
    """The cumulative buckets of each ``label`` value of histogram ``metric`` in an exposition."""
    found: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                found.setdefault(sample.labels[label], []).append(
                    (float(sample.labels["le"]), sample.value))
    for buckets in found.values():
        buckets.sort()
    return found


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of cumulative ``buckets``, interpolated inside its bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def difference(after: Buckets, before: Buckets) -> Buckets:
    """What was observed between two scrapes, stage by stage."""
    delta: Buckets = {}
    for stage, buckets in after.items():
        earlier = dict(before.get(stage, []))
        delta[stage] = [(bound, count - earlier.get(bound, 0.0)) for bound, count in buckets]
    return delta


def summarise(delta: Buckets, order: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{stage: {"count", "p50_ms", "p99_ms"}}`` in the order given."""
    result: dict[str, dict[str, Any]] = {}
    for stage in order:
        buckets = delta.get(stage, [])
        count = int(buckets[-1][1]) if buckets else 0
        figures = {q: quantile(buckets, share) for q, share in (("p50", 0.5), ("p99", 0.99))}
        result[stage] = {"count": count} | {
            f"{q}_ms": None if value is None else round(value * 1000, 3)
            for q, value in figures.items()
        }
    return result


def describe(stages: dict[str, dict[str, Any]]) -> str:
    """``backend.handler 0.41/0.98, …``: each stage's p50/p99 in ms, for a progress line."""
    return ", ".join(f"{name} {v['p50_ms']}/{v['p99_ms']}" for name, v in stages.items())


def gc_pauses(before: str, after: str) -> dict[str, dict[str, Any]]:
    """The gateway's garbage collections between two scrapes: count, and the longest pause
    (the upper bound of the highest bucket reached), by generation."""
    metric = "replyx_gc_pause_seconds"
    delta = difference(stage_buckets(after, metric, "generation"),
                       stage_buckets(before, metric, "generation"))
    result = {}
    for generation, buckets in sorted(delta.items()):
        count = int(buckets[-1][1]) if buckets else 0
        longest = next((bound for bound, n in buckets if n >= count), None) if count else None
        result[generation] = {"collections": count, "longest_under_ms": (
            None if longest is None else round(longest * 1000, 1))}
    return result


class StageProbe:
    """Scrapes the backend's and the gateway's ``/metrics`` around one measured phase."""

    def __init__(self, backend_url: str, gateway_url: str) -> None:
        self.urls = {BACKEND_STAGE_METRIC: backend_url, GATEWAY_STAGE_METRIC: gateway_url}
        self.before: dict[str, Buckets] = {}

    def start(self) -> None:
        self.before = {metric: stage_buckets(scrape(url), metric)
                       for metric, url in self.urls.items()}

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stage figures since :meth:`start`, backend stages first, in the message's order."""
        stages: dict[str, dict[str, Any]] = {}
        for metric, url in self.urls.items():
            delta = difference(stage_buckets(scrape(url), metric), self.before[metric])
            prefix, order = _ORDER[metric]
            stages |= {f"{prefix}.{name}": figures
                       for name, figures in summarise(delta, order).items()}
        return stages


_ORDER = {
    BACKEND_STAGE_METRIC: ("backend", [stage.value for stage in BackendStage]),
    GATEWAY_STAGE_METRIC: ("gateway", [stage.value for stage in GatewayStage]),
}
