"""The seeded fault schedule: which fault, when, for how long, against what.

:func:`make_schedule` is a pure function of the seed, the soak's length and the
fault kinds: the same three give the same list, which the report records and
prints, so a failing run can be replayed. Every kind appears at least
:func:`minimum_each` times (once a minute, five times in ten minutes), spread over the
soak in a seeded order; the rest are drawn at random times and overlap freely,
except that a kind marked *exclusive* never overlaps itself (two Postgres
crashes at once are one crash).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: A long soak schedules every kind at least once per this many seconds of its fault window.
EVERY_KIND = 110.0


def fault_window(soak_seconds: float, start: float = 3.0, tail: float = 12.0
                 ) -> tuple[float, float]:
    """When faults may run: after ``start``, over by ``soak_seconds - tail``."""
    return start, max(start + 1.0, soak_seconds - tail)


def minimum_each(soak_seconds: float) -> int:
    """How many times the schedule injects every kind at least (1 a minute, 5 in 10)."""
    start, end = fault_window(soak_seconds)
    return max(1, int((end - start) // EVERY_KIND))


@dataclass(frozen=True)
class KindSpec:
    """How the schedule draws one fault kind."""

    name: str
    #: (shortest, longest) duration in seconds; (0, 0) for an instant fault.
    duration: tuple[float, float] = (0.0, 0.0)
    #: Never overlaps another fault of the same kind.
    exclusive: bool = False
    #: Relative frequency among the extra (beyond once each) faults.
    weight: float = 1.0


@dataclass(frozen=True)
class FaultEvent:
    """One scheduled fault. ``pick`` seeds the fault's own choices (which socket, which worker)."""

    index: int
    at: float  # seconds after the soak started
    kind: str
    duration: float
    pick: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ends(self) -> float:
        return self.at + self.duration

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted(self.params.items()))
        span = f" for {self.duration:.1f}s" if self.duration else ""
        return f"t={self.at:6.1f}s  {self.kind}{span}{extra}"


def make_schedule(seed: int, soak_seconds: float, kinds: Sequence[KindSpec], *,
                  start: float = 3.0, tail: float = 12.0, mean_gap: float = 4.0
                  ) -> list[FaultEvent]:
    """The faults of one soak, in time order.

    :param start: no fault before this (the population is still connecting).
    :param tail: no fault starts in the last ``tail`` seconds, and every fault is over
        by then, so the soak ends with a quiet stretch in which everything must recover.
    :param mean_gap: mean time between the extra faults (beyond one of each kind).
    """
    rng = random.Random(f"replyx-chaos-schedule:{seed}")
    start, end = fault_window(soak_seconds, start, tail)
    window = end - start
    by_name = {k.name: k for k in kinds}
    drafts: list[tuple[float, str]] = []
    # minimum_each() of every kind, in a seeded order, one per slot of the window so all fit.
    order = [k.name for k in kinds] * max(1, int(window // EVERY_KIND))
    rng.shuffle(order)
    slot = window / max(1, len(order))
    for i, name in enumerate(order):
        drafts.append((start + slot * i + rng.uniform(0, slot * 0.8), name))
    # Extras: a Poisson stream over the window, kinds by weight.
    names = [k.name for k in kinds]
    weights = [k.weight for k in kinds]
    t = start + rng.expovariate(1 / mean_gap)
    while t < end and names:
        drafts.append((t, rng.choices(names, weights)[0]))
        t += rng.expovariate(1 / mean_gap)
    drafts.sort()

    events: list[FaultEvent] = []
    busy_until: dict[str, float] = {}
    for at, name in drafts:
        spec = by_name[name]
        low, high = spec.duration
        duration = round(rng.uniform(low, high), 2) if high else 0.0
        pick = rng.randrange(1 << 30)
        if spec.exclusive and at < busy_until.get(name, -1.0):
            at = busy_until[name] + 1.0
        if at + duration > end:
            if spec.exclusive and name in busy_until and at >= end:
                continue  # no room left for another one of these
            duration = round(max(0.0, min(duration, end - at)), 2) if high else 0.0
            at = min(at, end)
        busy_until[name] = at + duration
        events.append(FaultEvent(len(events), round(at, 2), name, duration, pick))
    events.sort(key=lambda e: (e.at, e.kind))
    return [FaultEvent(i, e.at, e.kind, e.duration, e.pick, e.params)
            for i, e in enumerate(events)]
