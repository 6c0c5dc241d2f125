"""Which event loop the servers run on: asyncio's own, or uvloop (``REPLYX_EVENT_LOOP``).

uvloop (libuv under asyncio's API) runs the same code with less overhead per
callback, per socket read and per timer; Tornado, asyncpg and psycopg run on
it unchanged. ``replyx bench`` measured what it buys (README, Benchmarks).
Invariant: the choice is made once per process, before its loop exists — by
:func:`runner` for the gateway, by :func:`install` in each gunicorn worker.
"""

from __future__ import annotations

import asyncio

import uvloop

LOOPS = ("asyncio", "uvloop")


def runner(name: str) -> asyncio.Runner:
    """An :class:`asyncio.Runner` on the named loop (the gateway's ``main``)."""
    return asyncio.Runner(loop_factory=uvloop.new_event_loop if name == "uvloop" else None)


def install(name: str) -> None:
    """Make the named loop the one the next ``get_event_loop()`` creates (gunicorn's
    tornado worker makes its IOLoop itself, after the fork)."""
    if name == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
