"""The real stack: ``replyx run`` as a subprocess (supervisord, gunicorn with 4 workers,
the gateway, nginx when installed) on free ports, against the test database."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from replyx.pg import EmbeddedPostgres
from replyx_ops.stack import nginx_available
from tests.fix_db import TEST_JWT_SECRET, child_environ, cluster_dir
from tests.fix_secrets import TOKEN_SHAPES, remember, watch_dir
from tests.net import free_port, http_status

BIN = Path(sys.executable).parent


class Stack:
    """One ``replyx run`` with its own data dir and ports."""

    def __init__(self, data_dir: Path, database_url: str | None, **env: str) -> None:
        self.data_dir = data_dir
        self.backend_port = free_port()
        # REPLYX_GATEWAYS=N listens on GATEWAY_PORT … GATEWAY_PORT+N-1.
        self.gateway_port = free_port(int(env.get("REPLYX_GATEWAYS", "1")))
        self.nginx_port = free_port()
        self.env = child_environ(**{
            "REPLYX_DATA_DIR": str(data_dir),
            "REPLYX_JWT_SECRET": TEST_JWT_SECRET,
            "BACKEND_PORT": str(self.backend_port),
            "GATEWAY_PORT": str(self.gateway_port),
            "NGINX_PORT": str(self.nginx_port),
            "REPLYX_LOG_LEVEL": "INFO",
            "REPLYX_PROBE_INTERVAL": "0.5",
            "REPLYX_PROBE_TIMEOUT": "1.0",
            **env,
        })
        if database_url is not None:
            self.env["DATABASE_URL"] = database_url
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}"

    @property
    def nginx(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    def start(self, *args: str, timeout: float = 90.0) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        watch_dir(self.data_dir)
        self.output = open(self.data_dir / "replyx-run.out", "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "replyx"), "run", *args],
            env=self.env, stdout=self.output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"replyx run exited {code}:\n{self.run_output()}")
            # `replyx run` prints its banner once both /health answer 200.
            if "Ctrl-C stops everything." in self.run_output():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not healthy in {timeout}s:\n{self.run_output()}")
            time.sleep(0.2)
        return self

    def healthy(self) -> bool:
        return (
            http_status(self.api + "/health") == 200
            and http_status(self.gateway + "/health") == 200
        )

    def run_output(self) -> str:
        path = self.data_dir / "replyx-run.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self, name: str) -> str:
        path = self.data_dir / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, name: str) -> str:
        """A program's log with its rotated files, oldest first."""
        log_dir = self.data_dir / "log"
        files = sorted(log_dir.glob(f"{name}.log.*"), key=lambda p: -int(p.suffix[1:]))
        return "".join(p.read_text(errors="replace") for p in [*files, log_dir / f"{name}.log"]
                       if p.exists())

    def ctl(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [str(BIN / "replyx"), "ctl", *args], env=self.env, capture_output=True, text=True,
            timeout=60, check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"replyx ctl {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "replyx"), *args], env=self.env, capture_output=True, text=True,
            timeout=120, check=False,
        )
        if "--password" in args:
            remember(args[args.index("--password") + 1], "password given to replyx")
        for match in TOKEN_SHAPES.finditer(result.stdout):
            remember(match.group(), f"token printed by replyx {args[0]}")
        return result

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self.output.close()


@pytest.fixture
def make_stack(
    tmp_path: Path, database_url: str
) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []
    with contextlib.ExitStack() as private_dirs:

        def make(*args: str, embedded: bool = False, **env: str) -> Stack:
            if embedded:
                # Its Postgres runs as an unprivileged user and must keep reaching its data
                # dir, which pytest's basetemp does not guarantee (see cluster_dir).
                data_dir = private_dirs.enter_context(cluster_dir())
                private_dirs.callback(EmbeddedPostgres(data_dir).stop)
            else:
                data_dir = tmp_path / f"stack{len(stacks)}"
            stack = Stack(data_dir, None if embedded else database_url, **env)
            stacks.append(stack)
            return stack.start(*args)

        yield make
        for stack in stacks:
            stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Stack]:
    """A stack shared by a module's tests that leave it as they found it."""
    s = Stack(tmp_path_factory.mktemp("stack"), database_url).start("--no-demo")
    yield s
    s.stop()


#: Log rotation of the ``ops`` stack: small, so test_logs.py sees it rotate.
LOG_MAX_BYTES = 32 * 1024
LOG_BACKUPS = 3


@pytest.fixture(scope="session")
def ops(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Stack]:
    """Run it like production: one ``replyx run`` with nginx for the operations tests
    (test_check, test_metrics, test_processes, test_logs, test_browser).

    Started on first use and shared by those modules, which would otherwise start one
    each; a test that stops or breaks a part of it puts it back before it ends, and
    counters are compared before and after, never read as totals.
    """
    assert nginx_available(), "nginx is not installed: apt-get install nginx-light (.ci/run does)"
    stack = Stack(
        tmp_path_factory.mktemp("ops"), database_url,
        REPLYX_LOG_MAX_BYTES=str(LOG_MAX_BYTES), REPLYX_LOG_BACKUPS=str(LOG_BACKUPS),
    ).start("--no-demo")
    yield stack
    stack.stop()
