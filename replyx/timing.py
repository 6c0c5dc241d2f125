"""Where a message's milliseconds go: the stages the backend and the gateway time.

A message's way from the sender to a socket, on the product's own clocks:

* **backend** (``replyx_backend_message_stage_seconds``) — ``handler``: request
  headers parsed → the INSERT is sent (body, JSON, auth, limits, routing);
  ``commit``: INSERT handed to the database → committed (Postgres: the statement,
  the triggers, the commit, a connection from the pool, and the wait for a shared
  commit while the worker's commits are busy, ``backend/group_commit.py``).

* **gateway** (``replyx_gateway_message_stage_seconds``) — ``notify``: the
  message's ``created_at`` (its transaction's start) → its NOTIFY is read off
  the LISTEN connection; ``queue``: read → taken by the consumer; ``parse``;
  ``deliver``: parsed → its frames handed to the kernel (the batch flushed).

The client's receive time closes the chain (``replyx bench`` measures it). The backend
times every posted message; the gateway a sample (every message of a batch up to a
burst's first 64, one in 16 past that: ``ws_gateway/consumer.py``).
Invariant: both processes use these names and :data:`STAGE_BUCKETS`, so the
bench reads every stage's histogram the same way; the buckets are fine enough
(±20 % from 25 µs to 5 s) for a median and a p99 to be read off them.
"""

from __future__ import annotations

from enum import StrEnum

#: Histogram bounds in seconds: 25 µs x 1.4^i, up to about 5 s.
STAGE_BUCKETS: tuple[float, ...] = tuple(round(25e-6 * 1.4**i, 7) for i in range(37))

BACKEND_STAGE_METRIC = "replyx_backend_message_stage_seconds"
GATEWAY_STAGE_METRIC = "replyx_gateway_message_stage_seconds"


class BackendStage(StrEnum):
    HANDLER = "handler"
    COMMIT = "commit"


class GatewayStage(StrEnum):
    NOTIFY = "notify"
    QUEUE = "queue"
    PARSE = "parse"
    DELIVER = "deliver"
