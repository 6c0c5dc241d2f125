"""``replyx check``: the migration guide's ``check_ws_gateway_architecture.sh``, as a command.

One line per part of the architecture, each PASS, FAIL (with a hint naming the
fix) or SKIP (a part that is not configured, or that cannot be checked because
what it rests on failed). Exit code 1 when anything failed; ``--json`` for scripts.

It only looks: it never starts the embedded Postgres, a process or a migration,
so a part that is down is reported as down. Processes are found through the
supervisord of ``replyx run`` (its XML-RPC socket under the data dir) when there
is one, and through the process table in any case. A running stack is found on its
own (:func:`replyx_ops.state.located`): its data dir, ports and database need not
be repeated in the environment.

The checks live by concern: ``postgres`` (server, schema, triggers, NOTIFY round
trip, the gateway's LISTEN session), ``processes`` (supervisord, gunicorn's
workers, one gateway, nginx's process) and ``http`` (both /health, nginx's routes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial

import orjson

from replyx.gateways import gateway_names, gateway_ports
from replyx.settings import Settings
from replyx_ops import state
from replyx_ops.check.base import FAIL, PASS, SKIP, CheckFailed, Result
from replyx_ops.check.http import HttpChecks
from replyx_ops.check.postgres import PostgresChecks
from replyx_ops.check.processes import ProcessChecks

__all__ = ["FAIL", "PASS", "SKIP", "CheckFailed", "Checker", "Result", "add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    nginx = parser.add_mutually_exclusive_group()
    nginx.add_argument(
        "--nginx", dest="nginx", action="store_true", default=None,
        help="check nginx on NGINX_PORT (default: when the supervisord of `replyx run` has it)",
    )
    nginx.add_argument("--no-nginx", dest="nginx", action="store_false",
                       help="do not check nginx")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long each probe may take (default 5)")


def main(settings: Settings, args: argparse.Namespace) -> int:
    # The stack's own data dir, ports and database, wherever this runs (replyx_ops.state).
    settings = state.located(settings)
    results = list(Checker(settings, nginx=args.nginx, timeout=args.timeout).run())
    failed = [r for r in results if r.status == FAIL]
    if args.json:
        sys.stdout.write(
            orjson.dumps({"ok": not failed, "checks": [asdict(r) for r in results]}).decode()
            + "\n"
        )
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            print(f"{r.status.upper():4}  {r.name:{width}}  {r.detail}")
            if r.status == FAIL and r.hint:
                print(f"{'':4}  {'':{width}}  hint: {r.hint}")
        skipped = sum(r.status == SKIP for r in results)
        if failed:
            print(f"replyx check: {len(failed)} of {len(results)} checks failed")
        else:
            print(f"replyx check: all {len(results) - skipped} checks passed"
                  + (f", {skipped} skipped" if skipped else ""))
    sys.stdout.flush()
    return 1 if failed else 0


class Checker(PostgresChecks, ProcessChecks, HttpChecks):
    """Every check, in the order of the report."""

    def run(self) -> Iterator[Result]:
        self._read_supervisor()
        db_ok = yield from self._one("postgres", self.check_postgres)
        if db_ok:
            yield from self._one("schema", self.check_schema)
            yield from self._one("triggers", self.check_triggers)
            yield from self.check_notify()
        else:
            why = "skipped: Postgres is not reachable"
            for name in ("schema", "triggers", "listen/notify", "gateway listener"):
                yield Result(name, SKIP, why)
        yield from self._one("backend health", self.check_backend_health)
        # One line per gateway (REPLYX_GATEWAYS): the failing one is named.
        for name, base in self.gateways:
            yield from self._one(f"{name} health", partial(self.check_gateway_health, name, base))
        yield from self._one("backend workers", self.check_backend_workers)
        for name, port in zip(gateway_names(self.settings), gateway_ports(self.settings),
                              strict=True):
            yield from self._one(f"{name} process", partial(self.check_gateway_process, name, port))
        if self._nginx_configured():
            yield from self._one("nginx", self.check_nginx_process)
            yield from self._one("nginx /api/", self.check_nginx_api)
            yield from self._one("nginx /ws/", self.check_nginx_ws)
        else:
            running = state.running(self.settings.data_dir)
            if running is not None and running.front == "proxy":
                yield Result("nginx", SKIP, f"not running: replyx run's Python stand-in serves"
                                            f" :{self.settings.nginx_port} (nginx not installed,"
                                            " or --no-nginx)")
            else:
                yield Result("nginx", SKIP, "not configured (pass --nginx to check it anyway)")
