"""HTTP API handlers, one module per audience: operator, site integration, widget."""
