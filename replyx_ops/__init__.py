"""Operator tools: the ``replyx`` command and what it runs.

The top of the import graph: it may import the servers (``backend``,
``ws_gateway``), the client and the shared library; nothing imports it.
``cli`` (the command), ``stack`` (``replyx run`` under supervisord),
``state`` (where a stack lives: its data dir, its lock, the ports it runs on),
``check/`` (``replyx check``, by concern), ``demo`` (the demo tenant),
``proxy`` (nginx's routes in Python, for machines without nginx), ``redact``
(the nginx log wrapper) and ``bench`` (``replyx bench``).
"""
