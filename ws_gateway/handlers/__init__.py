"""WebSocket endpoints (admin, widget, site) and the gateway's HTTP endpoints (debug)."""
