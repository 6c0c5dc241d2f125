"""The process half of ``replyx check``: supervisord, gunicorn's workers, one gateway, nginx."""

from __future__ import annotations

import xmlrpc.client
from typing import Any, cast

import psutil
from supervisor.xmlrpc import SupervisorTransport

from replyx_ops.check.base import CheckFailed, Probe, short


class ProcessChecks(Probe):

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
            self._supervisor_error = f"supervisord at {sock} does not answer ({short(exc)})"
            return
        # XML-RPC answers are untyped: supervisord documents both as lists of structs.
        self._supervisor = {info["name"]: info for info in cast(list[dict[str, Any]], infos)}
        self._supervisor_configs = {c["name"]: c for c in cast(list[dict[str, Any]], configs)}

    def _supervised_pid(self, program: str) -> tuple[int | None, str]:
        """The program's pid per supervisord (None when it is not RUNNING) and a note."""
        if self._supervisor is None:
            return None, self._supervisor_error or "no supervisord"
        info = self._supervisor.get(program)
        if info is None:
            return None, f"supervisord has no program {program}"
        # One of several gateways: supervisorctl names it group:process.
        spec = program if info.get("group", program) == program else f"{info['group']}:{program}"
        # STARTING: the process is up and has not yet lived `startsecs` (it may serve already).
        if info["statename"] not in ("RUNNING", "STARTING") or not info.get("pid"):
            raise CheckFailed(
                f"supervisord: {program} is {info['statename']}"
                + (f" ({info['description']})" if info.get("description") else ""),
                f"`replyx ctl start {spec}`; its log: {self.log_dir}/{program}.log",
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

    def check_gateway_process(self, name: str = "gateway", port: int | None = None) -> str:
        port = self.settings.gateway_port if port is None else port
        pid, note = self._supervised_pid(name)
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
