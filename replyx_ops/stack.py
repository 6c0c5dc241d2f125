"""``replyx run``: Postgres, migrations, then supervisord with the backend, the gateway and nginx.

supervisord runs in the foreground from ``conf/supervisord.conf``; everything
it needs to know arrives through environment variables (``%(ENV_…)s`` in the
config). Ctrl-C or SIGTERM stops supervisord, which stops its programs, and
then the embedded Postgres if this command started it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from replyx import schema
from replyx.gateways import gateway_names, gateway_ports
from replyx.pg import EmbeddedPostgres, redact_url
from replyx.settings import Settings
from replyx_ops import demo as demo_mod
from replyx_ops import state

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def stack_environ(settings: Settings, database_url: str, *, front: str) -> dict[str, str]:
    """The environment supervisord and its programs run with.

    :param front: what serves NGINX_PORT, ``nginx`` or ``proxy`` (conf/supervisord.d/).
    """
    # Every setting as this process read it (the data dir made absolute, the database the
    # one resolved here), then what only conf/supervisord.conf reads.
    env = dict(os.environ) | dataclasses.replace(settings, database_url=database_url).to_environ()
    env.update(
        {
            "REPLYX_ROOT": str(ROOT),
            "REPLYX_BIN": str(Path(sys.executable).parent),
            "REPLYX_FRONT": front,
            "REPLYX_GATEWAY_CONF": "gateway" if settings.gateways == 1 else "gateways",
            "REPLYX_NGINX_BIN": shutil.which("nginx") or "/usr/sbin/nginx",
            "REPLYX_NGINX_CONF": str(settings.data_dir / "nginx" / "nginx.conf"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def gateway_servers(addresses: list[str]) -> str:
    """The ``server`` directives of nginx's ``replyx_gateway`` upstream, one per ``host:port``.

    On one line: the header comment of conf/nginx.conf names the placeholder too.
    """
    # max_fails=0: a gateway that refuses is skipped for this connection only (next
    # upstream), never marked down. Marked down, nginx answered "no live upstreams" (502)
    # for a minute after a rolling restart while clients kept retrying, with both gateways up.
    return " ".join(f"server {address} max_fails=0;" for address in addresses)


def render_nginx_conf(settings: Settings, gateways: list[str] | None = None) -> Path:
    """Fill ``conf/nginx.conf``'s ``${…}`` placeholders; nginx's own ``$vars`` stay as they are.

    :param gateways: ``host:port`` of every gateway behind ``/ws/``; default: the
        REPLYX_GATEWAYS of this host on GATEWAY_PORT..+N-1.
    """
    if gateways is None:
        gateways = [f"127.0.0.1:{port}" for port in gateway_ports(settings)]
    target_dir = settings.data_dir / "nginx"
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (target_dir / sub).mkdir(parents=True, exist_ok=True)
    values = {
        "REPLYX_DATA_DIR": str(settings.data_dir),
        "NGINX_HOST": settings.host,
        "NGINX_PORT": str(settings.nginx_port),
        "BACKEND_PORT": str(settings.backend_port),
        "GATEWAY_PORT": str(settings.gateway_port),
        "GATEWAY_SERVERS": gateway_servers(gateways),
    }
    text = Template((CONF / "nginx.conf").read_text()).safe_substitute(values)
    target = target_dir / "nginx.conf"
    target.write_text(text)
    return target


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def wait_for(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def supervisorctl(settings: Settings, ctl_args: list[str]) -> int:
    running = state.running(settings.data_dir)
    front = running.front if running is not None and running.pid else "nginx"
    env = stack_environ(settings, settings.database_url or "", front=front)
    argv = [
        str(Path(sys.executable).parent / "supervisorctl"),
        "-c", str(CONF / "supervisord.conf"),
        *ctl_args,
    ]
    return subprocess.call(argv, env=env)


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind would fail)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def preflight(settings: Settings, lock: state.RunLock) -> str | None:
    """Why this stack cannot start, before anything is started; None when it can.

    Takes the data dir's lock on success (held until :meth:`RunLock.release`).
    """
    try:
        lock.acquire()
    except state.StackRunningError as exc:
        return (f"{exc}.\nStop it first (Ctrl-C in its terminal, or kill -TERM"
                f" {exc.state.pid if exc.state and exc.state.pid else '<its pid>'}),"
                " or give this one another REPLYX_DATA_DIR and other ports.")
    ports = [("BACKEND_PORT", settings.backend_port),
             *((f"GATEWAY_PORT+{i}" if i else "GATEWAY_PORT", port)
               for i, port in enumerate(gateway_ports(settings))),
             ("NGINX_PORT", settings.nginx_port)]
    busy = [f"{name}={port}" for name, port in ports if port_in_use(settings.host, port)]
    if busy:
        lock.release()
        return (f"{', '.join(busy)} already in use on {settings.host}: is another stack"
                " running from another data dir? Stop it, or choose free ports"
                f" ({' '.join(f'{name}=…' for name, _ in ports)}).")
    return None


def run(settings: Settings, *, demo: bool = True, nginx: bool = True) -> int:
    lock = state.RunLock(settings.data_dir)
    refusal = preflight(settings, lock)
    if refusal is not None:
        note(refusal)
        return 1
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    front = "nginx" if nginx and nginx_available() else "proxy"
    lock.write(state.StackState.of(settings, front))
    embedded: EmbeddedPostgres | None = None
    started_db = False
    supervisord: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            note("stopping…")
            if supervisord is not None:
                supervisord.send_signal(signal.SIGTERM)

    def stopped() -> bool:
        return stopping  # read through a call: the signal handler sets it at any line

    # From the first line: a signal during the migrations must still stop what was started.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in stop_signals}
    try:
        if settings.database_url:
            url = settings.database_url
        else:
            embedded = EmbeddedPostgres(settings.data_dir)
            started_db = not embedded.is_running()
            url = embedded.ensure_running()
        note(f"database: {redact_url(url)}" + (" (embedded)" if embedded else ""))
        schema.upgrade(url)
        note(f"schema at {schema.head_revision()}")
        settings.jwt_secret()  # create the development key before the workers race for it
        if stopped():
            return 0

        if front == "nginx":
            render_nginx_conf(settings)
        supervisord = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "supervisord"),
                "-n", "-c", str(CONF / "supervisord.conf"),
            ],
            env=stack_environ(settings, url, front=front),
            cwd=str(ROOT),
            # Own session: a terminal's Ctrl-C reaches us, and we stop supervisord in order.
            start_new_session=True,
        )
        host = settings.host
        backend_ok = wait_for(f"http://{host}:{settings.backend_port}/health", 60, supervisord)
        gateway_ok = all(wait_for(f"http://{host}:{port}/health", 60, supervisord)
                         for port in gateway_ports(settings))
        front_ok = wait_for(f"http://{host}:{settings.nginx_port}/health", 30, supervisord)
        if stopped():
            pass
        elif backend_ok and gateway_ok:
            print_banner(settings, url, Front(front, front_ok, nginx_available()), demo)
        elif supervisord.poll() is None:
            note(f"the stack did not become healthy; see the logs in {settings.log_dir}")
        while supervisord.poll() is None:
            try:
                supervisord.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if supervisord is not None and supervisord.poll() is None:
            supervisord.terminate()
            supervisord.wait(timeout=30)
        if embedded is not None and started_db:
            note("stopping the embedded Postgres")
            embedded.stop()
        lock.release()
    return 0 if stopping else (supervisord.returncode or 0)


def note(message: str) -> None:
    print(f"replyx run: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Front:
    """What serves NGINX_PORT, for the banner: ``nginx`` or ``proxy`` (the Python stand-in)."""

    kind: str
    answering: bool
    nginx_installed: bool


def front_lines(settings: Settings, front: Front) -> list[str]:
    """The banner's lines about NGINX_PORT: what serves it, and what does not run."""
    url = f"http://{settings.host}:{settings.nginx_port}"
    log_file = f"log {settings.log_dir}/{front.kind}.log"
    if not front.answering:
        return [f"  {front.kind:<7}  {url}  NOT answering: the demo pages are down; see {log_file}"]
    if front.kind == "nginx":
        return [f"  nginx    {url}  (/api/ → backend, /ws/ and /demo/ → gateway)   {log_file}"]
    why = "nginx is not installed" if not front.nginx_installed else "--no-nginx"
    return [
        f"  proxy    {url}  (/api/ → backend, /ws/ and /demo/ → gateway)   {log_file}",
        f"           nginx does not run ({why}): a Python stand-in (replyx_ops.proxy) routes"
        " as conf/nginx.conf does;",
        "           fine for trying it, not for production (apt-get install nginx-light).",
    ]


def gateway_lines(settings: Settings) -> list[str]:
    """The banner's gateway lines: one process, or each of REPLYX_GATEWAYS with its port."""
    host = settings.host
    if settings.gateways == 1:
        return [f"  gateway  ws://{host}:{settings.gateway_port}     (one process)"
                f"           log {settings.log_dir}/gateway.log"]
    return [
        f"  {name:<8} ws://{host}:{port}     (1 of {settings.gateways}, behind nginx /ws/)"
        f"   log {settings.log_dir}/{name}.log"
        for name, port in zip(gateway_names(settings), gateway_ports(settings), strict=True)
    ]


def print_banner(settings: Settings, url: str, front: Front, demo: bool) -> None:
    host = settings.host
    api = f"http://{host}:{settings.backend_port}"
    lines = [
        "",
        "ReplyX realtime is up.",
        f"  backend  {api}   (gunicorn, {settings.backend_workers} workers)"
        f"   log {settings.log_dir}/backend.log",
        *gateway_lines(settings),
        *front_lines(settings, front),
        f"  health   curl {api}/health ; curl http://{host}:{settings.gateway_port}/health",
        f"  debug    curl http://{host}:{settings.gateway_port}/api/debug/websocket/status",
        f"  metrics  curl {api}/metrics ; curl http://{host}:{settings.gateway_port}/metrics",
        f"  api      {api}/api/openapi.json   (OpenAPI 3.1)",
        "  check    .venv/bin/replyx check      (one line per part of the architecture)",
        "  psql     .venv/bin/replyx psql     then: LISTEN replyx_events;",
        f"  control  .venv/bin/replyx ctl status | restart backend | restart gateway"
        f" | restart {front.kind}",
    ]
    if demo:
        tenant = demo_mod.ensure_demo_tenant(settings, url)
        lines += ["", "Try it with the demo tenant:", *demo_mod.try_it_lines(settings, tenant)]
        pages = f"http://{host}:{settings.nginx_port}/demo"
        lines += [
            "  # 6. in a browser, side by side: the site widget (it opens a dialog of its own)",
            f"  {pages}/widget.html?assistant_id={tenant['assistant_id']}",
            "  #    and the operator panel: log in as above, pick the widget's dialog",
            f"  {pages}/admin.html",
        ]
    lines += ["", "Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)
