"""Network helpers of the suite, written once: a free port, HTTP polling (sync and async),
and polling any condition (:func:`eventually`).

Fixtures and tests import these instead of writing their own. The free port is the
benchmark's (``replyx_ops.bench.measure``), which must not import the tests.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from replyx_ops.bench.measure import free_port

__all__ = [
    "eventually", "free_port", "get_json", "get_text", "http_status", "wait_http", "wait_status",
]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status ``GET url`` answers, or ``None`` when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_http(url: str, timeout: float = 60.0, status: int = 200) -> float:
    """Poll ``url`` until it answers ``status`` (blocking); return how long that took."""
    started = time.monotonic()
    while http_status(url) != status:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{url} did not answer {status} within {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - started


async def get_json(url: str, **headers: str) -> tuple[int, Any]:
    """``GET url``: its status and its body, parsed when it is JSON (else the raw bytes)."""
    response = await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False,
                                             request_timeout=10)
    body = response.body or b""
    return response.code, orjson.loads(body) if body[:1] in (b"{", b"[") else body


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Poll ``condition`` every 20 ms until it holds; TimeoutError naming ``what`` after
    ``timeout`` seconds. For state that nothing announces (counters, sets, comments)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        await asyncio.sleep(0.02)


async def wait_status(url: str, status: int, timeout: float = 30.0) -> float:  # noqa: ASYNC109
    """Poll ``url`` until it answers ``status``; return how long that took.

    A refused connection counts as "not yet" (a process restarting), not as an error.
    """
    started = time.monotonic()
    code: int | None = None
    while True:
        try:
            code, _ = await get_json(url)
        except (OSError, HTTPClientError):
            code = None
        if code == status:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last {code})")
        await asyncio.sleep(0.05)


async def get_text(url: str, **headers: str) -> tuple[int, str]:
    """``GET url``: its status and its body as text."""
    response = await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False,
                                             request_timeout=10)
    return response.code, (response.body or b"").decode()
