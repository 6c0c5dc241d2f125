"""The WebSocket gateway: one Tornado process, one LISTEN connection, every socket."""
