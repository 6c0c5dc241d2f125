"""RFC 6455 to the letter (issue 16, item 8): every protocol error is answered with a close
frame carrying its code (1002, or 1007 for invalid UTF-8) before the TCP close, so the
client sees the code, not 1006; a close code the RFC forbids is answered 1002, never echoed.

Before: Tornado accepted unmasked frames, dropped the TCP connection without a close
frame on the rest (the client saw 1006), and echoed any close code back (999 included).
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from replyx.protocol import CloseCode
from tests.fix_apps import Api, Sockets
from tests.fix_db import Tenant
from tests.raw_socket import CLOSE, CONTINUATION, PING, TEXT, RawSocket
from ws_gateway.app import Gateway

PROTOCOL_ERROR, INVALID_DATA = 1002, 1007


async def violated(sockets: Sockets, tenant: Tenant, dialog_id: int, frames: list[bytes]
                   ) -> tuple[int | None, bool]:
    """Send ``frames`` on a fresh socket: (the server's close code, the TCP connection ended)."""
    raw = await RawSocket.connect(sockets.site_url(tenant, dialog_id))
    await raw.read_json("ready")
    await raw.send_many(frames)
    try:
        code = await raw.close_code(timeout=10)
        return code, await raw.ended(timeout=10)
    finally:
        raw.close()


def unmasked(opcode: int, payload: bytes) -> bytes:
    return struct.pack("!BB", 0x80 | opcode, len(payload)) + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@pytest.mark.gen_test(timeout=120)
async def test_each_protocol_error_gets_its_close_code_before_the_tcp_close(
    api: Api, sockets: Sockets, tenant: Tenant
) -> None:
    dialog_id = await api.site_dialog(tenant)
    watcher = await sockets.open(sockets.site_url(tenant, dialog_id))
    f = RawSocket.frame_bytes  # masked, as a client must
    raw = RawSocket.__new__(RawSocket)
    cases: dict[str, tuple[list[bytes], int]] = {
        "unmasked text frame": ([unmasked(TEXT, b'{"type":"ping"}')], PROTOCOL_ERROR),
        "unmasked ping": ([unmasked(PING, b"x")], PROTOCOL_ERROR),
        "invalid UTF-8 text": ([f(raw, TEXT, b"\xc3\x28")], INVALID_DATA),
        "invalid UTF-8 across fragments": (
            [f(raw, TEXT, b"ok \xe2\x82", fin=False), f(raw, CONTINUATION, b"\x28")], INVALID_DATA),
        "RSV1 set": ([bytes([0xC1]) + f(raw, TEXT, b"x")[1:]], PROTOCOL_ERROR),
        "RSV2 set": ([bytes([0xA1]) + f(raw, TEXT, b"x")[1:]], PROTOCOL_ERROR),
        "RSV3 set": ([bytes([0x91]) + f(raw, TEXT, b"x")[1:]], PROTOCOL_ERROR),
        **{f"reserved opcode {op:#x}": ([f(raw, op, b"x")], PROTOCOL_ERROR)
           for op in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)},
        "ping over 125 bytes": ([f(raw, PING, b"x" * 126)], PROTOCOL_ERROR),
        "close over 125 bytes": ([f(raw, CLOSE, close_payload(1000, b"x" * 200))], PROTOCOL_ERROR),
        "fragmented ping": ([f(raw, PING, b"x", fin=False)], PROTOCOL_ERROR),
        "continuation with nothing to continue": ([f(raw, CONTINUATION, b"x")], PROTOCOL_ERROR),
        "new message inside a fragmented one": (
            [f(raw, TEXT, b"[", fin=False), f(raw, TEXT, b"]")], PROTOCOL_ERROR),
        "close with a 1-byte payload": ([f(raw, CLOSE, b"\x03")], PROTOCOL_ERROR),
        "close reason not UTF-8": ([f(raw, CLOSE, close_payload(1000, b"\xff"))], INVALID_DATA),
        **{f"close code {code}": ([f(raw, CLOSE, close_payload(code))], PROTOCOL_ERROR)
           for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)},
    }
    for name, (frames, expected) in cases.items():
        code, ended = await violated(sockets, tenant, dialog_id, frames)
        assert code == expected, f"{name}: got {code}, expected {expected}"
        assert ended, f"{name}: the connection did not end"

    # Allowed codes are echoed, as the RFC says; an empty close is answered empty.
    for code in (1000, 1001, 1003, 1011, 3000, 4000, 4999):
        frames = [f(raw, CLOSE, close_payload(code))]
        got, ended = await violated(sockets, tenant, dialog_id, frames)
        assert (got, ended) == (code, True), code
    got, ended = await violated(sockets, tenant, dialog_id, [f(raw, CLOSE, b"")])
    assert (got, ended) == (None, True)

    # None of it touched anyone else.
    posted = await api.post_site(tenant, dialog_id, "still here")
    await watcher.wait_for_seq(posted["seq"])
    assert watcher.close_codes == [] and watcher.gaps == 0 and watcher.duplicates == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_close_the_gateway_starts_ends_the_connection_once_the_client_answers(
    api: Api, sockets: Sockets, gateway: Gateway, tenant: Tenant
) -> None:
    """RFC 6455 §7.1.1: after both close frames the server drops TCP at once. Before, the
    client's answer was ignored and the connection (its slot, its place in a shutdown) was
    held until Tornado's 5 s wait expired, so every SIGTERM took the whole grace."""
    dialog_id = await api.site_dialog(tenant)
    raw = await RawSocket.connect(sockets.site_url(tenant, dialog_id))
    await raw.read_json("ready")
    stopping = asyncio.ensure_future(gateway.stop())  # 1012 to every socket
    try:
        assert await raw.close_code(timeout=10) == CloseCode.RESTARTING
        await raw.send(CLOSE, close_payload(CloseCode.RESTARTING))
        assert await raw.ended(timeout=2), "the gateway held the connection after the handshake"
        await asyncio.wait_for(stopping, 2)  # nothing left to wait for: well within the grace
    finally:
        raw.close()
