"""Capped exponential backoff with jitter: the one retry schedule of every reconnecting part.

The listener, the router's catch-up, the gateway's start, the schema check of a
process started during a Postgres restart and the clients all wait the same way:
``initial`` doubling up to ``maximum``, each delay spread by ±``jitter`` so a
crowd of clients (or sockets) does not retry in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.25
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        """The delay to wait now; the one after it is ``factor`` times longer, up to the cap."""
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def reset(self) -> None:
        """After a success: the next failure waits ``initial`` again."""
        self._next = self.initial
