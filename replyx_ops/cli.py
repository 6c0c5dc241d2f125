"""``replyx``: the command line. JSON for scripts on stdout, logs on stderr."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from backend import store, workspace
from backend.db import Database
from replyx import logs, schema, security
from replyx.origins import normalize_origin
from replyx.pg import EmbeddedPostgres, EmbeddedPostgresError, libpq_url, psql_binary
from replyx.schema import SchemaMismatchError
from replyx.settings import ConfigError, Settings
from replyx_ops import chaos, check, rolling, stack, state
from replyx_ops.bench import hostile as bench_hostile
from replyx_ops.bench import notify as bench_notify
from replyx_ops.bench import rounds as bench_rounds
from replyx_ops.bench import run as bench_run
from replyx_ops.bench import workspace as bench_workspace

log = logging.getLogger("replyx")

T = TypeVar("T")


class CommandError(Exception):
    """A failure the user can fix; printed as one line, exit code 1."""


def emit(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


# An embedded server that a one-shot command had to start is stopped again when it ends,
# so `replyx create-user …` leaves nothing running. `replyx run`, `dsn` and `psql` keep it.
_started_embedded: list[EmbeddedPostgres] = []

#: The commands that may create a database; every other one uses the stack it finds.
CREATING = ("run", "migrate")
#: Commands whose arguments after the command name go, as given, to another program.
PASSTHROUGH = {"psql": "psql_args", "ctl": "ctl_args"}


def database_url(settings: Settings, *, keep_running: bool = False, create: bool = False) -> str:
    """``DATABASE_URL``, else the embedded server under the data dir (started when stopped).

    Only with ``create`` (``replyx run`` and ``replyx migrate``) is a new embedded
    database initialised; otherwise a data dir without one is an error that says so.
    """
    if settings.database_url:
        return settings.database_url

    embedded = EmbeddedPostgres(settings.data_dir)
    if not create and not (embedded.pgdata / "PG_VERSION").exists():
        raise CommandError(state.not_found_message(settings))
    was_running = embedded.is_running()
    url = embedded.ensure_running()
    if not was_running and not keep_running:
        _started_embedded.append(embedded)
    return url


def with_session(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(session)`` on a short-lived engine against the schema at head."""

    url = database_url(settings)
    schema.ensure_at_head(schema.current_revision(url))

    async def main() -> T:
        db = Database(url, pool_size=1, max_overflow=0)
        try:
            async with db.session() as session:
                return await work(session)
        finally:
            await db.dispose()

    return asyncio.run(main())


# -- commands ------------------------------------------------------------------


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    # The stack this machine already has, when there is one; else a new database here.
    found = state.find_data_dir(settings)
    if found is not None:
        settings = dataclasses.replace(settings, data_dir=found)
    url = database_url(settings, create=True)
    before = schema.current_revision(url)
    schema.upgrade(url)
    emit({"from": before, "to": schema.current_revision(url)})
    return 0


def cmd_create_user(settings: Settings, args: argparse.Namespace) -> int:
    if "@" not in args.email or len(args.email) > 320:
        raise CommandError(f"{args.email!r} is not an email address")
    if len(args.password) < 8:
        raise CommandError("the password must be at least 8 characters")
    try:
        user_id = with_session(
            settings, lambda s: store.create_user(s, args.email, args.password)
        )
    except store.EmailTakenError:
        raise CommandError(f"a user with email {args.email} already exists") from None
    emit({"user_id": user_id})
    return 0


def cmd_create_assistant(settings: Settings, args: argparse.Namespace) -> int:
    domains: list[str] = []
    for raw in args.domain:
        origin = normalize_origin(raw, default_scheme="https")
        if origin is None:
            raise CommandError(f"--domain {raw!r} is not an origin (https://host[:port])")
        if origin not in domains:
            domains.append(origin)

    async def work(session: Any) -> Any:
        if not await store.user_exists(session, args.user_id):
            raise CommandError(f"no user with id {args.user_id}")
        return await store.create_assistant(session, args.user_id, args.name, domains)

    created = with_session(settings, work)
    emit(
        {
            "assistant_id": created.assistant_id,
            "site_token": created.site_token,
            "domains": created.domains,
        }
    )
    return 0


def cmd_add_operator(settings: Settings, args: argparse.Namespace) -> int:
    async def work(session: Any) -> bool:
        if await store.assistant_by_id(session, args.assistant_id) is None:
            raise CommandError(f"no assistant with id {args.assistant_id}")
        if not await store.user_exists(session, args.user_id):
            raise CommandError(f"no user with id {args.user_id}")
        return await workspace.add_operator(session, args.assistant_id, args.user_id)

    added = with_session(settings, work)
    emit({"assistant_id": args.assistant_id, "user_id": args.user_id, "added": added})
    return 0


def cmd_remove_operator(settings: Settings, args: argparse.Namespace) -> int:
    async def work(session: Any) -> None:
        try:
            await workspace.remove_operator(session, args.assistant_id, args.user_id)
        except workspace.NotATeamMemberError as exc:
            raise CommandError(str(exc)) from None

    with_session(settings, work)
    emit({"assistant_id": args.assistant_id, "user_id": args.user_id, "removed": True})
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    if settings.jwt_secret_env is None and not (settings.data_dir / "jwt_secret").exists():
        # Minting one here would sign with a key no server of the stack knows.
        raise CommandError(f"no signing key in {settings.data_dir} (set REPLYX_JWT_SECRET,"
                           f" or start the stack first); {state.not_found_message(settings)}")
    if not with_session(settings, lambda s: store.user_exists(s, args.user_id)):
        raise CommandError(f"no user with id {args.user_id}")
    ttl = args.ttl if args.ttl is not None else settings.jwt_ttl_seconds
    print(security.issue_operator_token(args.user_id, settings.jwt_secret(), ttl))
    return 0


def cmd_dsn(settings: Settings, args: argparse.Namespace) -> int:
    print(database_url(settings, keep_running=True))
    return 0


def cmd_psql(settings: Settings, args: argparse.Namespace) -> int:
    url = libpq_url(database_url(settings, keep_running=True))
    binary = psql_binary()
    os.execv(binary, [binary, url, *args.psql_args])  # noqa: S606


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    return stack.run(settings, demo=not args.no_demo, nginx=not args.no_nginx)


def cmd_ctl(settings: Settings, args: argparse.Namespace) -> int:
    if state.running(settings.data_dir) is None:
        looked = (str(settings.data_dir) if state.holds_a_stack(settings.data_dir)
                  else " or ".join(str(d) for d in state.candidates(settings)))
        raise CommandError(f"no stack is running (looked in {looked}): start one with"
                           " `replyx run`, or point REPLYX_DATA_DIR at its data dir")
    if args.ctl_args in rolling.RESTART_ARGS:
        # One at a time: at most one gateway's sockets reconnect at once.
        return rolling.rolling_restart(settings, lambda a: stack.supervisorctl(settings, a))
    return stack.supervisorctl(settings, args.ctl_args)


def cmd_stop_db(settings: Settings, args: argparse.Namespace) -> int:
    if settings.database_url:
        raise CommandError("DATABASE_URL is set: the embedded server is not in use")
    embedded = EmbeddedPostgres(settings.data_dir)
    if not (embedded.pgdata / "PG_VERSION").exists():
        raise CommandError(state.not_found_message(settings))
    embedded.stop()
    return 0


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replyx",
        description="ReplyX realtime: chat events from Postgres NOTIFY to browser WebSockets.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole stack in the foreground under supervisord")
    p.add_argument("--no-demo", action="store_true", help="do not create the demo tenant")
    p.add_argument("--no-nginx", action="store_true", help="do not start nginx")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("migrate", help="bring the schema to the newest migration")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("create-user", help='create an operator; prints {"user_id": N}')
    p.add_argument("email")
    p.add_argument("--password", required=True)
    p.set_defaults(func=cmd_create_user)

    p = sub.add_parser("create-assistant", help="create an assistant; prints its site token")
    p.add_argument("--user-id", type=_positive_int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument(
        "--domain", action="append", default=[], metavar="ORIGIN",
        help="an allowed widget origin, e.g. https://shop.example (repeatable)",
    )
    p.set_defaults(func=cmd_create_assistant)

    for name, func, what in (("add-operator", cmd_add_operator, "put a user on"),
                             ("remove-operator", cmd_remove_operator, "take a user off")):
        p = sub.add_parser(name, help=f"{what} an assistant's team (JSON out)")
        p.add_argument("--assistant-id", type=_positive_int, required=True)
        p.add_argument("--user-id", type=_positive_int, required=True)
        p.set_defaults(func=func)

    p = sub.add_parser("token", help="print an operator JWT (for wscat / curl)")
    p.add_argument("--user-id", type=_positive_int, required=True)
    p.add_argument("--ttl", type=_positive_int, default=None, help="lifetime in seconds")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("check", help="the architecture check: one pass/fail line per part")
    p.set_defaults(func=check.main)
    check.add_arguments(p)

    p = sub.add_parser("bench", help="the load and latency benchmark")
    p.set_defaults(func=lambda settings, args: (
        bench_rounds.main if args.rounds else bench_run.main)(settings, args))
    bench_run.add_arguments(p)

    p = sub.add_parser("bench-hostile",
                       help="bystanders' latency and gateway memory under hostile load")
    p.set_defaults(func=bench_hostile.main)
    bench_hostile.add_arguments(p)

    p = sub.add_parser("bench-notify",
                       help="the NOTIFY ceiling: commits/s by listener count, 1 vs 2 gateways")
    p.set_defaults(func=bench_notify.main)
    bench_notify.add_arguments(p)

    p = sub.add_parser("bench-workspace",
                       help="inbox latency and presence churn (the operator's workspace)")
    p.set_defaults(func=bench_workspace.main)
    bench_workspace.add_arguments(p)

    p = sub.add_parser("chaos", help="the seeded fault soak, checked against the database")
    p.set_defaults(func=chaos.main)
    chaos.add_arguments(p)

    p = sub.add_parser(
        "dsn", help="print the database URL in use (starts the stack's embedded server)")
    p.set_defaults(func=cmd_dsn)

    p = sub.add_parser(
        "psql", help="psql on the database in use; every later argument goes to psql as given")
    p.add_argument("psql_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_psql)

    p = sub.add_parser("ctl", help="supervisorctl for the stack of `replyx run`")
    p.add_argument("ctl_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser("stop-db", help="stop the embedded Postgres")
    p.set_defaults(func=cmd_stop_db)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, except that ``psql`` and ``ctl`` hand every later argument on as given.

    (argparse's REMAINDER refuses a first argument that looks like an option, such
    as ``psql -c "select 1"``.) A leading ``--`` is dropped; ``--help`` alone is ours.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if args_list and args_list[0] in PASSTHROUGH and args_list[1:] != ["--help"]:
        command, rest = args_list[0], args_list[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        args = parser.parse_args([command])
        setattr(args, PASSTHROUGH[command], rest)
        return args
    return parser.parse_args(args_list)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_environ()
    except ConfigError as exc:
        print(f"replyx: {exc}", file=sys.stderr)
        return 2
    logs.setup_logging(settings.log_level or "WARNING")
    # The benchmark and the soak bring a stack and a database of their own.
    if args.command not in CREATING and not args.command.startswith(("bench", "chaos")):
        # Whatever directory this runs in: the stack's data dir, ports and database.
        settings = state.located(settings)

    try:
        code: int = args.func(settings, args)
        return code
    except (CommandError, ConfigError, SchemaMismatchError, EmbeddedPostgresError) as exc:
        print(f"replyx {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        while _started_embedded:
            _started_embedded.pop().stop()


if __name__ == "__main__":
    sys.exit(main())
