"""Each setting is declared once (replyx/settings.py), checked at start, and documented.

A bad value stops every process with one line naming the variable, never a
traceback and never the value of a secret; the example env file is the
declarations' own rendering; no module reads a setting from ``os.environ``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replyx.settings import ConfigError, Settings, example_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_the_example_env_file_is_generated_from_the_declarations() -> None:
    example = (ROOT / "conf" / "replyx.env.example").read_text()
    assert example == example_env(), "run: python -m replyx.settings > conf/replyx.env.example"
    for line in example.splitlines():
        if line and not line.startswith("#"):
            name = line.split("=", 1)[0]
            # Every uncommented line sets a variable to its default: loading the file changes
            # nothing but what the reader edits.
            assert Settings.from_environ({name: line.split("=", 1)[1]}) == Settings(), line


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("REPLYX_PING_INTERVAL", "-5", "positive number of seconds"),
        ("REPLYX_JOIN_TIMEOUT", "nan", "positive number of seconds"),
        ("REPLYX_PROBE_TIMEOUT", "inf", "positive number of seconds"),
        ("REPLYX_SOCKET_BUFFER", "0", "at least 4096 bytes"),
        ("REPLYX_MAX_FRAME", "12k", "must be a number"),
        ("REPLYX_LOG_LEVEL", "loud", "one of DEBUG"),
        ("BACKEND_PORT", "70000", "port number"),
        ("BACKEND_WORKERS", "0", "positive integer"),
        ("REPLYX_CLIENT_RATE", "0", "positive number"),
        ("REPLYX_WIDGET_ORIGIN", "widget.example/path", "must be an origin"),
        ("REPLYX_LOGIN_MAX_FAILURES", "-1", "positive integer"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        Settings.from_environ({name: value})
    assert str(caught.value).startswith(f"{name}={value!r}")


def test_a_malformed_secret_is_named_never_echoed() -> None:
    url = "mysql://replyx:hunter2-secret@db.example/replyx"
    with pytest.raises(ConfigError, match="DATABASE_URL is not a postgresql") as caught:
        Settings.from_environ({"DATABASE_URL": url})
    assert "hunter2" not in str(caught.value)


def test_settings_survive_the_trip_to_a_child_process(tmp_path: Path) -> None:
    settings = Settings.from_environ({
        "REPLYX_DATA_DIR": str(tmp_path), "GATEWAY_PORT": "9101", "REPLYX_PING_INTERVAL": "2.5",
        "REPLYX_WIDGET_ORIGIN": "HTTPS://Widget.Example:443", "REPLYX_LOG_LEVEL": "debug",
    })
    assert settings.widget_origin == "https://widget.example"
    assert settings.log_level == "DEBUG"
    assert Settings.from_environ(settings.to_environ()) == settings


@pytest.mark.parametrize("argv", [["-m", "ws_gateway"], ["-m", "replyx_ops.cli", "migrate"]])
def test_processes_stop_at_start_with_one_line(tmp_path: Path, argv: list[str]) -> None:
    env = {**os.environ, "REPLYX_DATA_DIR": str(tmp_path), "REPLYX_LOG_LEVEL": "loud"}
    result = subprocess.run([str(BIN / "python"), *argv], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "REPLYX_LOG_LEVEL='loud'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pg").exists()  # refused before anything was started


#: Modules that hand the whole environment on to a child process, and why.
PASS_THROUGH = {
    "replyx/settings.py": "the one reader of settings",
    "replyx_ops/stack.py": "supervisord's programs inherit the environment",
    "replyx_ops/bench/servers.py": "the benchmark's servers inherit the environment",
    "replyx_ops/chaos/stack.py": "the soak's stack (replyx run) inherits the environment",
    "replyx_ops/bench/peers/starlette_broadcaster.py": "the peer is another product",
}


def test_no_module_reads_a_setting_from_os_environ() -> None:
    readers = []
    for package in ("replyx", "replyx_client", "replyx_ops", "backend", "ws_gateway",
                    "migrations"):
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in PASS_THROUGH:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                    readers.append(f"{rel}:{node.lineno}")
    assert not readers, readers
