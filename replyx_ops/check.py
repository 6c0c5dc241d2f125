"""``replyx check``: the migration guide's ``check_ws_gateway_architecture.sh``, as a command.

One line per part of the architecture, each PASS, FAIL (with a hint naming the
fix) or SKIP (a part that is not configured, or that cannot be checked because
what it rests on failed). Exit code 1 when anything failed; ``--json`` for scripts.

It only looks: it never starts the embedded Postgres, a process or a migration,
so a part that is down is reported as down. Processes are found through the
supervisord of ``replyx run`` (its XML-RPC socket under the data dir) when there
is one, and through the process table in any case.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import psutil
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from supervisor.xmlrpc import SupervisorTransport
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from replyx import schema
from replyx.pg import EmbeddedPostgres, libpq_url, redact_url
from replyx.protocol import LISTENER_APPLICATION as LISTENER_APP
from replyx.protocol import MAX_ID
from replyx.protocol import NOTIFY_CHANNEL as CHANNEL
from replyx.settings import Settings

PASS, FAIL, SKIP = "pass", "fail", "skip"

#: The triggers that make the architecture work (migrations 0001 and 0003).
TRIGGERS = ("messages_append_only", "messages_assign_seq", "messages_keep_seq", "messages_notify")
#: A dialog id no dialog has: the check's NOTIFY is routed to nobody.
NOWHERE = MAX_ID


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    hint: str = ""


class CheckFailed(Exception):
    """A check found a problem: ``str(exc)`` says what, ``hint`` how to fix it."""

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.hint = hint


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


class Checker:
    def __init__(self, settings: Settings, *, nginx: bool | None, timeout: float) -> None:
        self.settings = settings
        self.nginx = nginx
        self.timeout = timeout
        host = settings.host
        # A wildcard bind address is reached through loopback.
        self.host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104
        self.backend = f"http://{self.host}:{settings.backend_port}"
        self.gateway = f"http://{self.host}:{settings.gateway_port}"
        self.proxy = f"http://{self.host}:{settings.nginx_port}"
        self.log_dir = settings.log_dir
        self.url: str | None = None
        self._supervisor: dict[str, dict[str, Any]] | None = None
        self._supervisor_configs: dict[str, dict[str, Any]] = {}
        self._supervisor_error = ""
        self._listeners: dict[int, set[int]] | None = None

    # -- running the checks ------------------------------------------------------

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
        yield from self._one("gateway health", self.check_gateway_health)
        yield from self._one("backend workers", self.check_backend_workers)
        yield from self._one("gateway process", self.check_gateway_process)
        if self._nginx_configured():
            yield from self._one("nginx", self.check_nginx_process)
            yield from self._one("nginx /api/", self.check_nginx_api)
            yield from self._one("nginx /ws/", self.check_nginx_ws)
        else:
            yield Result("nginx", SKIP, "not configured (pass --nginx to check it anyway)")

    def _one(self, name: str, check: Callable[[], str]) -> Generator[Result, None, bool]:
        """Run one check; yield its result and return whether it passed."""
        try:
            detail = check()
        except CheckFailed as exc:
            yield Result(name, FAIL, str(exc), exc.hint)
            return False
        except Exception as exc:
            yield Result(name, FAIL, f"{type(exc).__name__}: {_short(exc)}")
            return False
        yield Result(name, PASS, detail)
        return True

    # -- Postgres ------------------------------------------------------------------

    def _connect(self, **kwargs: Any) -> Any:

        assert self.url is not None
        return psycopg.connect(
            libpq_url(self.url), connect_timeout=max(1, int(self.timeout)),
            application_name="replyx-check", **kwargs,
        )

    def check_postgres(self) -> str:

        if self.settings.database_url:
            self.url = self.settings.database_url
            where = redact_url(self.url)
            hint = "is the server up, and DATABASE_URL right? `psql \"$DATABASE_URL\"` tells"
        else:
            embedded = EmbeddedPostgres(self.settings.data_dir)
            if not embedded.is_running():
                raise CheckFailed(
                    f"the embedded Postgres in {embedded.pgdata} is not running",
                    "start the stack with `replyx run` (or set DATABASE_URL to your server)",
                )
            self.url = embedded.url()
            where = f"embedded, {embedded.pgdata}"
            hint = f"see {embedded.log_file}"
        try:
            with self._connect() as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
        except psycopg.Error as exc:
            raise CheckFailed(f"cannot connect ({where}): {_short(exc)}", hint) from None
        return f"Postgres {version} reachable ({where})"

    def check_schema(self) -> str:

        assert self.url is not None
        current = schema.current_revision(self.url)
        head = schema.head_revision()
        if current != head:
            found = "an empty database" if current is None else f"revision {current}"
            raise CheckFailed(f"at {found}, the code needs {head}", "run `replyx migrate`")
        return f"at head ({head})"

    def check_triggers(self) -> str:
        with self._connect() as conn:
            if conn.execute("SELECT to_regclass('messages')").fetchone()[0] is None:
                raise CheckFailed("no table messages", "run `replyx migrate`")
            rows = conn.execute(
                "SELECT tgname, tgenabled FROM pg_trigger"
                " WHERE tgrelid = 'messages'::regclass AND NOT tgisinternal"
            ).fetchall()
            source = conn.execute(
                "SELECT prosrc FROM pg_proc WHERE proname = 'replyx_notify_message'"
            ).fetchone()
        state = dict(rows)
        missing = [t for t in TRIGGERS if t not in state]
        # 'O' fires in normal sessions, 'A' always; 'D' is disabled, 'R' replica-only.
        disabled = [t for t in TRIGGERS if t in state and state[t] not in ("O", "A")]
        if missing:
            raise CheckFailed(
                f"missing on messages: {', '.join(missing)}",
                "the schema was changed by hand: restore the triggers of"
                " migrations/versions/0001_initial.py",
            )
        if disabled:
            raise CheckFailed(
                f"disabled on messages: {', '.join(disabled)}",
                "; ".join(f"ALTER TABLE messages ENABLE TRIGGER {t}" for t in disabled),
            )
        if source is None or f"'{CHANNEL}'" not in source[0]:
            raise CheckFailed(
                f"replyx_notify_message() does not notify channel {CHANNEL}",
                "restore it from migrations/versions/0001_initial.py",
            )
        return f"{', '.join(TRIGGERS)} enabled; NOTIFY on channel {CHANNEL}"

    def check_notify(self) -> Iterator[Result]:
        """A NOTIFY on the real channel, seen by our own LISTEN and counted by the gateway."""
        counted_before = self._gateway_notifications()
        marker = secrets.token_hex(8)
        # A typing event for a dialog that does not exist: valid, so the gateway parses and
        # counts it without a warning, and routed to no socket.
        payload = orjson.dumps(
            {"type": "typing", "dialog_id": NOWHERE, "sender": "system", "check": marker}
        ).decode()
        try:
            with self._connect(autocommit=True) as listen, self._connect() as sender:
                listen.execute(f"LISTEN {CHANNEL}")
                started = time.monotonic()
                sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                sender.commit()
                seen = False
                deadline = started + self.timeout
                while not seen and time.monotonic() < deadline:
                    wait = max(0.01, deadline - time.monotonic())
                    for note in listen.notifies(timeout=wait):
                        if marker in note.payload:
                            seen = True
                            break
                took = time.monotonic() - started
                listeners = listen.execute(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = %s",
                    (LISTENER_APP,),
                ).fetchall()
        except Exception as exc:
            yield Result("listen/notify", FAIL, f"{type(exc).__name__}: {_short(exc)}")
            yield Result("gateway listener", SKIP, "skipped: the round trip failed")
            return
        if seen:
            yield Result("listen/notify", PASS,
                         f"LISTEN {CHANNEL} got our NOTIFY in {took * 1000:.0f} ms")
        else:
            yield Result(
                "listen/notify", FAIL, f"our NOTIFY did not arrive within {self.timeout:g}s",
                "LISTEN/NOTIFY needs a direct session: not through a transaction-pooling"
                " pgbouncer",
            )
        yield from self._one(
            "gateway listener",
            lambda: self._check_listener([pid for (pid,) in listeners], counted_before),
        )

    def _check_listener(self, pids: list[int], counted_before: float | None) -> str:
        hint = (f"start the gateway: `replyx ctl start gateway`; its log:"
                f" {self.log_dir}/gateway.log")
        if not pids:
            raise CheckFailed(f"no {LISTENER_APP} session in pg_stat_activity", hint)
        if len(pids) > 1:
            raise CheckFailed(
                f"{len(pids)} LISTEN sessions (backend pids {', '.join(map(str, pids))}):"
                " more than one gateway runs on this database",
                "run exactly one gateway process; stop the others",
            )
        if counted_before is None:
            raise CheckFailed(f"LISTEN session pid {pids[0]}, but {self.gateway}/metrics"
                              " does not answer", hint)
        # Any notification counts: under traffic ours is one of many, and that is fine.
        deadline = time.monotonic() + self.timeout
        while True:
            counted = self._gateway_notifications()
            if counted is not None and counted > counted_before:
                return (f"one LISTEN session (backend pid {pids[0]});"
                        " the gateway received our NOTIFY")
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"LISTEN session pid {pids[0]}, but the gateway counted no notification"
                    f" within {self.timeout:g}s",
                    f"see {self.log_dir}/gateway.log and GET {self.gateway}/health",
                )
            time.sleep(0.1)

    def _gateway_notifications(self) -> float | None:

        try:
            _, _, body = self._get(self.gateway + "/metrics")
        except OSError:
            return None
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "replyx_notifications_total":
                    return sample.value
        return None

    # -- HTTP health -----------------------------------------------------------------

    def _get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def _health(self, program: str, base: str, why_503: str) -> bytes:
        """The body of ``base/health`` when it answers 200; else a failure naming the fix."""
        hint = f"`replyx ctl start {program}`; its log: {self.log_dir}/{program}.log"
        try:
            status, _, body = self._get(base + "/health")
        except OSError as exc:
            raise CheckFailed(f"{base}/health: {_short(exc)}", hint) from None
        if status != 200:
            raise CheckFailed(f"{base}/health answered {status} {_body(body)}",
                              f"503: {why_503}; " + hint)
        return body

    def check_backend_health(self) -> str:
        body = self._health("backend", self.backend, "the backend cannot reach Postgres")
        return f"{self.backend}/health 200 {_body(body)}"

    def check_gateway_health(self) -> str:
        body = self._health(
            "gateway", self.gateway, "the LISTEN connection is down or catching up"
        )
        health = orjson.loads(body)
        return (f"{self.gateway}/health 200: listener {health.get('listener')},"
                f" {health.get('sockets')} socket(s),"
                f" notification lag {_ms(health.get('notification_lag_ms'))}")

    # -- processes -------------------------------------------------------------------

    def _read_supervisor(self) -> None:
        sock = self.settings.supervisor_socket
        if not sock.exists():
            self._supervisor_error = f"no supervisord socket at {sock}"
            return

        transport = SupervisorTransport(None, None, f"unix://{sock}")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            infos = proxy.supervisor.getAllProcessInfo()
            configs = proxy.supervisor.getAllConfigInfo()
        except (OSError, xmlrpc.client.Error) as exc:
            self._supervisor_error = f"supervisord at {sock} does not answer ({_short(exc)})"
            return
        self._supervisor = {info["name"]: info for info in infos}  # type: ignore[union-attr]
        self._supervisor_configs = {c["name"]: c for c in configs}  # type: ignore[union-attr]

    def _supervised_pid(self, program: str) -> tuple[int | None, str]:
        """The program's pid per supervisord (None when it is not RUNNING) and a note."""
        if self._supervisor is None:
            return None, self._supervisor_error or "no supervisord"
        info = self._supervisor.get(program)
        if info is None:
            return None, f"supervisord has no program {program}"
        # STARTING: the process is up and has not yet lived `startsecs` (it may serve already).
        if info["statename"] not in ("RUNNING", "STARTING") or not info.get("pid"):
            raise CheckFailed(
                f"supervisord: {program} is {info['statename']}"
                + (f" ({info['description']})" if info.get("description") else ""),
                f"`replyx ctl start {program}`; its log: {self.log_dir}/{program}.log",
            )
        return info["pid"], f"supervisord: {info['statename']}"

    def _listening_pids(self, port: int) -> set[int]:

        if self._listeners is None:
            table: dict[int, set[int]] = {}
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
                    table.setdefault(conn.laddr.port, set()).add(conn.pid)
            self._listeners = table
        return self._listeners.get(port, set())

    def check_backend_workers(self) -> str:

        port = self.settings.backend_port
        expected = self.settings.backend_workers
        master, note = self._supervised_pid("backend")
        listening = self._listening_pids(port)
        if master is None:
            # No supervisord. A listener on the port is a gunicorn worker (with SO_REUSEPORT
            # each worker has its own socket) or the master: walk up to the master, the
            # oldest ancestor that is the same program or holds the socket too.
            if not listening:
                raise CheckFailed(
                    f"no backend listening on :{port} ({note})",
                    f"`replyx ctl start backend` (or `replyx run`);"
                    f" log: {self.log_dir}/backend.log",
                )
            master = min(listening)
            while (parent := _ppid(master)) and (
                _same_program(parent, master) or _holds_listener(parent, port)
            ):
                master = parent
        try:
            workers = [
                child for child in psutil.Process(master).children()
                if child.status() != psutil.STATUS_ZOMBIE
            ]
        except psutil.NoSuchProcess:
            raise CheckFailed(f"backend master pid {master} is gone") from None
        if master not in listening and not listening & {w.pid for w in workers}:
            raise CheckFailed(f"backend pid {master} does not listen on :{port}",
                              f"is BACKEND_PORT={port} what it was started with?")
        if len(workers) != expected:
            raise CheckFailed(
                f"gunicorn master {master} has {len(workers)} worker(s), expected {expected}",
                f"BACKEND_WORKERS={expected}; `replyx ctl restart backend`;"
                f" log: {self.log_dir}/backend.log",
            )
        pids = ", ".join(str(w.pid) for w in workers)
        return f"{note}; gunicorn master {master} with {expected} workers ({pids}) on :{port}"

    def check_gateway_process(self) -> str:

        port = self.settings.gateway_port
        pid, note = self._supervised_pid("gateway")
        listening = self._listening_pids(port)
        if pid is None:
            if not listening:
                raise CheckFailed(f"nothing listens on :{port} ({note})",
                                  "`replyx ctl start gateway` (or `replyx run`)")
            pid = min(listening)
        if listening != {pid}:
            others = ", ".join(str(p) for p in sorted(listening - {pid})) or "none"
            raise CheckFailed(
                f"gateway pid {pid}, but the processes listening on :{port} are"
                f" {sorted(listening) or 'none'} (others: {others})",
                "the gateway must be ONE process: no workers, no second copy on the port",
            )
        children = psutil.Process(pid).children()
        if children:
            raise CheckFailed(f"gateway pid {pid} has {len(children)} child process(es)",
                              "the gateway must be ONE process (python -m ws_gateway)")
        return f"{note}; one process, pid {pid}, on :{port}"

    # -- nginx -------------------------------------------------------------------------

    def _nginx_configured(self) -> bool:
        if self.nginx is not None:
            return self.nginx
        config = self._supervisor_configs.get("nginx")
        return bool(config and config.get("autostart"))

    def check_nginx_process(self) -> str:
        port = self.settings.nginx_port
        if self._supervisor is not None and "nginx" in self._supervisor:
            _, note = self._supervised_pid("nginx")
        else:
            note = self._supervisor_error or "no supervisord"
        if not self._listening_pids(port):
            raise CheckFailed(f"nothing listens on :{port} ({note})",
                              f"`replyx ctl start nginx`; its log: {self.log_dir}/nginx.log")
        return f"{note}; listening on :{port}"

    def check_nginx_api(self) -> str:
        url = self.proxy + "/api/dialogs"
        try:
            status, headers, _ = self._get(url)
        except OSError as exc:
            raise CheckFailed(
                f"{url}: {_short(exc)}",
                f"`replyx ctl start nginx`; its log: {self.log_dir}/nginx.log",
            ) from None
        worker = headers.get("X-Replyx-Worker")
        if status in (502, 504):
            raise CheckFailed(f"{url}: nginx answered {status}: the backend behind it is down",
                              "`replyx ctl start backend`")
        if worker is None or status != 401:
            raise CheckFailed(
                f"{url}: {status} without the backend's X-Replyx-Worker header",
                "conf/nginx.conf: `location /api/ { proxy_pass http://replyx_backend; }`",
            )
        return f"GET /api/dialogs → backend worker {worker} (401 without a token, as it should)"

    def check_nginx_ws(self) -> str:
        url = self.proxy.replace("http://", "ws://", 1) + "/ws/health"
        try:
            frame = asyncio.run(self._ws_frame(url))
        except Exception as exc:
            code = getattr(exc, "code", None)
            if code in (502, 504):
                why, hint = (f"nginx answered {code}: the gateway behind it is down",
                             "`replyx ctl start gateway`")
            elif code in (400, 426):
                why, hint = (f"the gateway refused the upgrade ({code}): Upgrade headers lost",
                             "conf/nginx.conf: proxy_http_version 1.1 and"
                             " proxy_set_header Upgrade/Connection in location /ws/")
            else:
                why, hint = (_short(exc),
                             f"`replyx ctl start nginx`; its log: {self.log_dir}/nginx.log")
            raise CheckFailed(f"{url}: {why}", hint) from None
        if frame.get("type") != "health":
            raise CheckFailed(f"{url}: unexpected first frame {frame!r}",
                              "conf/nginx.conf: /ws/ must proxy to the gateway")
        return f"WebSocket upgrade on /ws/health → gateway, status {frame.get('status')}"

    async def _ws_frame(self, url: str) -> dict[str, Any]:

        request = HTTPRequest(url, connect_timeout=self.timeout, request_timeout=self.timeout)
        conn = await websocket_connect(request, ping_interval=None)
        try:
            raw = await asyncio.wait_for(conn.read_message(), self.timeout)
        finally:
            conn.close()
        if raw is None:
            raise CheckFailed("closed without a frame")
        return orjson.loads(raw)


def _holds_listener(pid: int, port: int) -> bool:

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in conns)


def _same_program(a: int, b: int) -> bool:

    try:
        return psutil.Process(a).name() == psutil.Process(b).name()
    except psutil.Error:
        return False


def _ppid(pid: int) -> int | None:

    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket error
    if isinstance(reason, BaseException):
        exc = reason
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _body(body: bytes) -> str:
    return " ".join(body.decode(errors="replace").split())[:160]


def _ms(value: float | None) -> str:
    return "- (no message yet)" if value is None else f"{value} ms"
