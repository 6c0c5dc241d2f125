"""``python -m ws_gateway``: run one gateway on ``GATEWAY_PORT`` (+ its instance number - 1)."""

from __future__ import annotations

import logging
import sys

from replyx import eventloop, logs
from replyx.gateways import gateway_name
from replyx.pg import resolve_database_url
from replyx.schema import SchemaMismatchError
from replyx.settings import ConfigError, Settings
from ws_gateway.app import RouterFactory, serve
from ws_gateway.router import Router


def main(router_factory: RouterFactory = Router) -> int:
    """Run one gateway; ``router_factory`` lets ``replyx bench`` run its naive fan-out."""
    try:
        settings = Settings.from_environ()
    except ConfigError as exc:
        print(f"ws_gateway: {exc}", file=sys.stderr)
        return 2
    # One gateway keeps the plain format; among several, each line names its gateway.
    name = gateway_name(settings)
    logs.setup_logging(settings.log_level or "INFO", name=None if name == "gateway" else name)
    try:
        url = resolve_database_url(settings.database_url, settings.data_dir)
        with eventloop.runner(settings.event_loop) as runner:
            runner.run(serve(settings, url, router_factory=router_factory))
    except (SchemaMismatchError, ConfigError) as exc:
        logging.getLogger("ws_gateway").error("refusing to start: %s", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
