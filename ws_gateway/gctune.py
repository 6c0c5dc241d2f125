"""The gateway process's garbage collector: fewer, shorter full collections.

A full collection walks every tracked object and stops the event loop meanwhile:
with 4,000 sockets open it took 250-500 ms (``replyx_gc_pause_seconds``), and
under connection churn (100 connects and disconnects per second) CPython's
default thresholds ran one every 30 s or so — the dialog p99 went from 5 to
120 ms (``replyx bench-workspace``). Two changes, measured there:

* :func:`tune` freezes what exists once the gateway is up (modules, classes, the
  parts — nothing that ever becomes garbage), so no collection walks it again;
* larger thresholds: a young generation of 20,000 objects and a full collection
  only after 100 middle ones.

A closed socket's objects are freed by reference counting, not left to a
collection: ``Session.ended`` drops the session's transport, which points back at
it. Before that, each closed socket left ~42 objects in a cycle; under churn they
were promoted before they died, and since each death lowers the young count while
new sockets fill the young list, young collections came seconds apart and walked
60,000-110,000 objects (30-100 ms each). With the cycle gone the churn phase of
``replyx bench-workspace`` ran no collection at all. Collecting on a clock instead
(the young generation every 50 ms, the middle one every second) was tried and not
kept: middle collections of 25-50 ms, a worse churn p99.

The consumer's batches (``ws_gateway/consumer.py``: notifications routed into held
frames, up to 10 ms; a burst's, thousands of them, up to ~110 ms) run with
collections off (:func:`hold`, :func:`release`), so a collection never stands
between a notification and its frames. In a burst everything allocated — queued
payloads, held frames, timing tuples, log lines — is alive until it ends and dead
right after, by reference counting; a young collection inside it walked them all for
nothing (1-2 of 5-25 ms per burst at 1,000 msg/s), and a middle one, once every 20
young ones, walked every socket opened since the last (120-135 ms after 2,000
sockets had connected) in the middle of the burst. After the batch, the next
allocation anywhere runs the collection that is due, over little that is young.

Invariant: collections still happen (cyclic garbage is reclaimed), only less often,
and never inside a batch of the consumer (which releases them across its one await
of unknown length, a ``message_ref``'s read); :func:`tune` is called once, from the process
entry point, never in a process that hosts others (the tests run gateways inside
pytest); :func:`hold` / :func:`release` only ever turn off what was on, and back.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 20, 100)


def tune() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def hold() -> bool:
    """No collection until :func:`release`; whether collections were on (pass it there)."""
    enabled = gc.isenabled()
    gc.disable()
    return enabled


def release(enabled: bool) -> None:
    if enabled:
        gc.enable()
