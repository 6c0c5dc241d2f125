"""Server frames, encoded once: every socket of a dialog is written the same bytes.

Invariant: a frame built here is a complete, unmasked, unfragmented RFC 6455
text frame, so the write path may concatenate frames and hand them to the
kernel as they are, and never needs to cut one.
"""

from __future__ import annotations

import struct


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked, unfragmented RFC 6455 text frame around ``payload``.

    Built once per event and written as-is to every socket of the dialog.
    """
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", 0x81, length) + payload
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


PONG_FRAME = text_frame(b'{"type":"pong"}')


def ready_frame(dialog_id: int, last_seq: int) -> bytes:
    return text_frame(b'{"type":"ready","dialog_id":%d,"last_seq":%d}' % (dialog_id, last_seq))
