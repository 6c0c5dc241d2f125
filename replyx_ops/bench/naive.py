"""The naive fan-out, for comparison only.

``python -m replyx_ops.bench.naive`` runs the same gateway with it.

Tornado's chat demo keeps each event as a dict and calls ``write_message`` on
every waiter, so every socket pays for its own JSON encoding, frame building,
and the Future and Task that ``write_message`` returns. :class:`NaiveRouter`
does exactly that and nothing else differently: the same listener, consumer,
seq bookkeeping and sockets as the real gateway, so the benchmark compares the
fan-out loop alone.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
from tornado.iostream import StreamBufferFullError
from tornado.websocket import WebSocketClosedError

from ws_gateway import __main__ as gateway_main
from ws_gateway.router import Router, Subscriber


def frame_payload(frame: bytes) -> bytes:
    """The payload of an unmasked server frame built by ``frames.text_frame``."""
    length = frame[1] & 0x7F
    return frame[2 + {126: 2, 127: 8}.get(length, 0) :]


class NaiveRouter(Router):
    def fan_out(self, dialog_id: int, seq: int, frame: bytes, subs: set[Subscriber]) -> None:
        message: dict[str, Any] = orjson.loads(frame_payload(frame))
        sent = 0
        tick = self._tick
        for sub in tuple(subs):
            if sub.buffer is not None:
                sub.buffer.append((tick, seq, frame))
                continue
            if seq != sub.sent_seq + 1:
                # The benchmark's sockets never fall behind; the real router's gap handling
                # is not what is being compared.
                continue
            try:
                # The gateway's sockets are Tornado handlers; Tornado's own per-socket write
                # path (encode, frame, Future) is exactly what is being compared.
                sub.write_message(message)  # type: ignore[attr-defined]
            except (WebSocketClosedError, StreamBufferFullError):
                continue
            sub.sent_seq = seq
            sent += 1
        self.stats.frames_sent += sent


def main() -> int:
    return gateway_main.main(router_factory=NaiveRouter)


if __name__ == "__main__":
    sys.exit(main())
