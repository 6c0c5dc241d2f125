"""Clients of the gateway that resume as a browser should: keep the last seq, reconnect with it.

The test suite and ``replyx bench`` use them; ``ws_gateway/static/replyx.js`` is
the same logic for browsers. This package imports only the shared library
(:mod:`replyx`), never the servers.
"""

from replyx_client.dialog import DialogClient, DialogClosedError, Frame
from replyx_client.inbox import InboxClient

__all__ = ["DialogClient", "DialogClosedError", "Frame", "InboxClient"]
