"""The stack under test: its own database, the Postgres proxy, and ``replyx run`` itself.

* **Database.** A fresh ``replyx_chaos_<hex>`` database, dropped afterwards: on the
  server of ``DATABASE_URL`` when set, else on an embedded cluster of the soak's own
  (``$REPLYX_DATA_DIR/chaos/pg``), never the one ``replyx run`` serves the product
  from, because the soak crashes it.
* **Proxy.** The embedded server listens on a Unix socket only. Rather than give it a
  TCP port, the proxy listens on TCP and connects upstream to that socket (or to
  ``DATABASE_URL``'s host and port), so the same code serves both cases and the
  server's configuration stays the product's. ``DATABASE_URL`` of the stack is the
  proxy; it classifies connections by ``application_name`` (see :mod:`.proxy`) so
  faults hit the gateway while the backend keeps writing.
* **Processes.** ``replyx run --no-demo`` as a subprocess on free ports with its own
  data dir: supervisord, gunicorn with the product's 4 workers, the gateway (with
  ``gateways`` over 1, that many behind nginx, ``REPLYX_GATEWAYS``, on consecutive
  free ports and named as :mod:`replyx.gateways` names them), nginx when installed.
  supervisord's XML-RPC socket tells us the current pids, by gateway name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import xmlrpc.client
from pathlib import Path
from typing import Any

import psutil
import psycopg
from supervisor.xmlrpc import SupervisorTransport

from replyx import schema
from replyx.gateways import gateway_names, gateway_ports
from replyx.pg import EmbeddedPostgres, libpq_url, with_database
from replyx.settings import Settings
from replyx_ops.bench.measure import free_port
from replyx_ops.bench.servers import BenchDatabase
from replyx_ops.chaos.proxy import PgProxy, postgres_target, via_proxy
from replyx_ops.stack import ROOT, nginx_available, wait_for


class StackError(RuntimeError):
    """The stack could not be started."""


class ChaosDatabase(BenchDatabase):
    """:class:`BenchDatabase` (and so :class:`~replyx_ops.bench.servers.Tenant`) for the soak,
    on a server the soak may crash when it is the embedded one."""

    def __init__(self, server_url: str | None, data_dir: Path) -> None:
        self.embedded: EmbeddedPostgres | None = None
        self.started_embedded = False
        if server_url is None:
            self.embedded = EmbeddedPostgres(data_dir / "chaos")
            self.started_embedded = not self.embedded.is_running()
            server_url = self.embedded.ensure_running()
        self.admin_url = with_database(libpq_url(server_url), "postgres")
        self.name = f"replyx_chaos_{secrets.token_hex(4)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = with_database(self.admin_url, self.name)
        schema.upgrade(self.url)

    @property
    def can_crash(self) -> bool:
        return self.embedded is not None

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: no checkpoint, every session dropped, as in a crash."""
        assert self.embedded is not None
        self.embedded.stop(mode="immediate")

    def restart(self) -> None:
        assert self.embedded is not None
        self.embedded.start()


class Stack:
    """``replyx run --no-demo`` on free ports, behind the proxy, in ``run_dir``."""

    def __init__(self, settings: Settings, run_dir: Path, db: ChaosDatabase, *,
                 nginx: bool = True, gateways: int = 1,
                 extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.db = db
        self.gateways = gateways
        self.nginx = nginx and nginx_available()
        self.backend_port, self.gateway_port = free_port(), free_port(gateways)
        self.nginx_port = free_port()
        layout = dataclasses.replace(settings, gateways=gateways, gateway_port=self.gateway_port)
        #: Gateway name → its port, as ``replyx run`` starts them (``gateway`` or ``gateway-i``).
        self.gateway_ports = dict(zip(gateway_names(layout), gateway_ports(layout), strict=True))
        self.jwt_secret = secrets.token_urlsafe(48)
        self.proxy = PgProxy(postgres_target(db.url))
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run_dir / "replyx-run.log"

    # -- addresses ---------------------------------------------------------------------

    @property
    def public_http(self) -> str:
        """Where clients go: nginx when present, else the backend itself."""
        port = self.nginx_port if self.nginx else self.backend_port
        return f"http://127.0.0.1:{port}"

    @property
    def public_ws(self) -> str:
        port = self.nginx_port if self.nginx else self.gateway_port
        return f"ws://127.0.0.1:{port}"

    @property
    def gateway_http(self) -> str:
        """The first gateway (the only one unless ``gateways`` is over 1)."""
        return f"http://127.0.0.1:{self.gateway_port}"

    def gateway_urls(self) -> dict[str, str]:
        """Every gateway's own address, by name."""
        return {name: f"http://127.0.0.1:{port}" for name, port in self.gateway_ports.items()}

    @property
    def backend_http(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    # -- lifecycle ---------------------------------------------------------------------

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "REPLYX_DATA_DIR": str(self.run_dir),
            "DATABASE_URL": via_proxy(self.db.url, self.proxy.port),
            "BACKEND_PORT": str(self.backend_port),
            "GATEWAY_PORT": str(self.gateway_port),
            "NGINX_PORT": str(self.nginx_port),
            "REPLYX_HOST": "127.0.0.1",
            "REPLYX_JWT_SECRET": self.jwt_secret,
            "REPLYX_LOG_LEVEL": "INFO",
        })
        env.pop("REPLYX_LISTEN_DATABASE_URL", None)  # the LISTEN connection: the proxy too
        if self.gateways > 1:
            env["REPLYX_GATEWAYS"] = str(self.gateways)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.proxy.start()
        argv = [sys.executable, "-m", "replyx_ops.cli", "run", "--no-demo"]
        if not self.nginx:
            argv.append("--no-nginx")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=self.environ(), cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        for url in (f"{self.backend_http}/health",
                    *(f"{gateway}/health" for gateway in self.gateway_urls().values()),
                    *([f"{self.public_http}/health"] if self.nginx else [])):
            if not wait_for(url, timeout, self.proc):
                raise StackError(f"{url} not healthy within {timeout:.0f}s; see {self.log_path}"
                                 f" and {self.run_dir / 'log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # replyx run stops supervisord, which stops nginx, the gateway, the backend.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._kill_leftovers()
        self.proxy.close()

    def _kill_leftovers(self) -> None:
        """supervisord runs in a session of its own: if it outlived ``replyx run``, end it."""
        pidfile = self.run_dir / "supervisord.pid"
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            proc = psutil.Process(int(pidfile.read_text().strip()))
            if "supervisord" in " ".join(proc.cmdline()):
                proc.terminate()
                proc.wait(30)

    # -- processes -------------------------------------------------------------------------

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.run_dir / 'supervisor.sock'}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def program_pid(self, name: str) -> int | None:
        """The pid supervisord has for ``name`` (``gateway``, ``backend``); ``None`` if down."""
        try:
            info = self._rpc().supervisor.getProcessInfo(name)
        except (OSError, xmlrpc.client.Fault):
            return None
        pid = int(info.get("pid") or 0)
        return pid or None

    def gateway_processes(self) -> dict[str, int]:
        """Every running gateway: name (``gateway``, ``gateway-1``…) → pid."""
        try:
            infos = self._rpc().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault):
            return {}
        return {str(info["name"]): int(info["pid"]) for info in infos
                if str(info.get("name", "")) in self.gateway_ports and info.get("pid")}

    def gateway_pids(self) -> list[int]:
        return sorted(self.gateway_processes().values())

    def backend_workers(self) -> list[int]:
        master = self.program_pid("backend")
        if master is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [child.pid for child in psutil.Process(master).children()]
        return []

    @staticmethod
    def rss_bytes(pid: int) -> int | None:
        with contextlib.suppress(psutil.Error):
            return int(psutil.Process(pid).memory_info().rss)
        return None

