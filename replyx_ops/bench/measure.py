"""Small measuring helpers of ``replyx bench``: progress lines, percentiles, the machine,
where a result is written.

Invariant: a benchmark never overwrites an earlier result (:func:`result_paths`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from replyx_ops.stack import port_in_use


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}",
              file=sys.stderr, flush=True)


def result_paths(output: Path, name: str, suffixes: tuple[str, ...] = (".json",)
                 ) -> list[Path]:
    """Where one result goes, a path per suffix: ``output/name<suffix>``, or under
    ``name-2``, ``-3``…, the first stem with no file of any of ``suffixes`` yet. A second run
    on the same day (every name carries the date) is kept next to the first, not written
    over it; ``bench/results`` holds committed runs."""
    output.mkdir(parents=True, exist_ok=True)
    stem, n = name, 1
    while any((output / (stem + suffix)).exists() for suffix in suffixes):
        n += 1
        stem = f"{name}-{n}"
    return [output / (stem + suffix) for suffix in suffixes]


#: Where free ports are drawn from: at or above this, and below the kernel's ephemeral range.
PORTS_FROM = 20000


def free_port(count: int = 1, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive TCP ports of ``host`` that can be bound right now
    (``count`` > 1: a stack's gateways on ``GATEWAY_PORT`` … ``GATEWAY_PORT+N-1``).

    Drawn at random below the kernel's ephemeral range (``ip_local_port_range``), so no
    client connection's own port takes one between now and the server's bind: with the
    suite on two workers, a ``GATEWAY_PORT+1`` from that range was once taken that way.
    """
    below = _ephemeral_low() - count
    rng = random.SystemRandom()
    for _ in range(500):
        base = rng.randrange(PORTS_FROM, below)
        if not any(port_in_use(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {PORTS_FROM}-{below + count}")


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if low > PORTS_FROM + 1000:
            return low
    return 32768  # Linux's default


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        data: dict[str, Any] = json.loads(response.read())
        return data


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 2)}


def machine_info(pg_version: str, load_before: tuple[float, ...],
                 load_after: tuple[float, ...]) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": pg_version,
        "kernel": platform.release(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }
