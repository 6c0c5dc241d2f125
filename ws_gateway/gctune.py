"""The gateway process's garbage collector: fewer, shorter full collections.

A full collection walks every tracked object and stops the event loop meanwhile:
with 4,000 sockets open it took 250-500 ms (``replyx_gc_pause_seconds``), and
under connection churn (100 connects and disconnects per second) CPython's
default thresholds ran one every 30 s or so — the dialog p99 went from 5 to
120 ms (``replyx bench-workspace``). Two changes, measured there:

* :func:`tune` freezes what exists once the gateway is up (modules, classes, the
  parts — nothing that ever becomes garbage), so no collection walks it again;
* larger thresholds: a young generation of 20,000 objects (most per-connection
  objects die there, unpromoted) and a full collection only after 100 middle ones.

Invariant: collections still happen (cyclic garbage is reclaimed), only less often;
called once, from the process entry point, never in a process that hosts others
(the tests run gateways inside pytest).
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 20, 100)


def tune() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
