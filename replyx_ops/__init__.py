"""Operator tools: the ``replyx`` command and what it runs.

The top of the import graph: it may import the servers (``backend``,
``ws_gateway``), the client and the shared library; nothing imports it.
``cli`` (the command), ``stack`` (``replyx run`` under supervisord),
``check`` (``replyx check``), ``demo`` (the demo tenant), ``redact`` (the nginx
log wrapper) and ``bench`` (``replyx bench``).
"""
