"""The gateway's endpoints: dialog sockets (``admin``, ``widget``, ``site`` on ``base``),
``health``, ``debug`` and ``metrics`` (on ``http``). Each is built with the gateway's parts."""
