"""Replay pages, and what bounds their memory.

Invariant: a page holds at most ``page_bytes`` of frames (one row at least: the query
stops once the rows before a row reach the budget), and every page in memory holds a
:class:`~ws_gateway.limits.Lease` on the gateway-wide byte budget from before its query
until its rows are written, so all replays together never hold more than the budget
(plus one row each). What was written then waits in each socket's write buffer, which
its own limit and the slow-client policy (4008) bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from ws_gateway.limits import Lease


@dataclass(frozen=True, slots=True)
class Mark:
    """Where routing stood when a query began: ``tick`` orders buffered frames against
    its snapshot, ``generation`` tells whether notifications may have been lost since."""

    tick: int
    generation: int


@dataclass(slots=True)
class Page:
    """One replay page, the mark taken before its query and its room in the budget.

    Mutable so that the replay can drop the rows it has written: nothing else may hold them.
    """

    mark: Mark
    rows: list[tuple[int, bytes]]
    lease: Lease | None = None
