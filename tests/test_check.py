"""`replyx check`, the architecture check, against the shared production-like stack
(``ops`` in tests/fix_stack.py): healthy, each part stopped, schema behind, trigger off,
and no stack at all."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from replyx.pg import EmbeddedPostgres
from tests.fix_db import child_environ
from tests.fix_stack import BIN, Stack
from tests.net import free_port, wait_http

HEALTHY = [
    "postgres", "schema", "triggers", "listen/notify", "gateway listener",
    "backend health", "gateway health", "backend workers", "gateway process",
    "nginx", "nginx /api/", "nginx /ws/",
]


def check(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    result = stack.cli("check", "--json", *args)
    assert result.stdout, result.stderr
    report = orjson.loads(result.stdout)
    return result.returncode, report


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def failed(report: dict[str, Any]) -> set[str]:
    return {name for name, status in statuses(report).items() if status == "fail"}


def wait_healthy(stack: Stack) -> None:
    for url in (stack.api + "/health", stack.gateway + "/health", stack.nginx + "/health"):
        wait_http(url, timeout=60)


# -- replyx check -------------------------------------------------------------------


def test_check_passes_on_a_healthy_stack(ops: Stack) -> None:
    result = ops.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"replyx check: all {len(HEALTHY)} checks passed"
    assert [line.split()[0] for line in lines[:-1]] == ["PASS"] * len(HEALTHY)
    assert "gunicorn master" in result.stdout and "with 4 workers" in result.stdout

    code, report = check(ops)
    assert code == 0 and report["ok"] is True
    assert list(statuses(report)) == HEALTHY
    assert set(statuses(report).values()) == {"pass"}


@pytest.mark.parametrize(
    ("program", "broken"),
    [
        ("gateway", {"gateway listener", "gateway health", "gateway process", "nginx /ws/"}),
        ("backend", {"backend health", "backend workers", "nginx /api/"}),
        ("nginx", {"nginx", "nginx /api/", "nginx /ws/"}),
    ],
)
def test_check_names_each_stopped_part_and_how_to_fix_it(
    ops: Stack, program: str, broken: set[str]
) -> None:
    ops.ctl("stop", program)
    try:
        code, report = check(ops)
    finally:
        ops.ctl("start", program)
        wait_healthy(ops)
    assert code == 1 and report["ok"] is False
    assert failed(report) == broken
    for c in report["checks"]:
        if c["status"] == "fail":
            assert c["hint"], c
    assert any(f"replyx ctl start {program}" in c["hint"] for c in report["checks"])


def test_check_finds_a_schema_behind_and_a_disabled_trigger(
    ops: Stack, sql: psycopg.Connection[Any]
) -> None:
    (revision,) = sql.execute("SELECT version_num FROM alembic_version").fetchone()
    sql.execute("UPDATE alembic_version SET version_num = '0000_older'")
    try:
        code, report = check(ops)
    finally:
        sql.execute("UPDATE alembic_version SET version_num = %s", (revision,))
    assert code == 1 and failed(report) == {"schema"}
    schema = next(c for c in report["checks"] if c["name"] == "schema")
    assert "0000_older" in schema["detail"] and schema["hint"] == "run `replyx migrate`"

    sql.execute("ALTER TABLE messages DISABLE TRIGGER messages_notify")
    try:
        code, report = check(ops)
    finally:
        sql.execute("ALTER TABLE messages ENABLE TRIGGER messages_notify")
    assert code == 1 and failed(report) == {"triggers"}
    triggers = next(c for c in report["checks"] if c["name"] == "triggers")
    assert "messages_notify" in triggers["detail"]
    assert "ENABLE TRIGGER messages_notify" in triggers["hint"]


def test_check_without_a_stack_fails_and_starts_nothing(tmp_path: Path) -> None:
    env = child_environ(REPLYX_DATA_DIR=str(tmp_path / "var"), BACKEND_PORT=str(free_port()),
                        GATEWAY_PORT=str(free_port()), NGINX_PORT=str(free_port()))
    result = subprocess.run([str(BIN / "replyx"), "check", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    report = orjson.loads(result.stdout)
    states = statuses(report)
    assert states["postgres"] == "fail"
    assert "replyx run" in report["checks"][0]["hint"]
    for name in ("schema", "triggers", "listen/notify", "gateway listener"):
        assert states[name] == "skip"
    for name in ("backend health", "gateway health", "backend workers", "gateway process"):
        assert states[name] == "fail"
    assert states["nginx"] == "skip"  # no supervisord says it is configured

    # For people: one line per check, the hint under each failure, a summary last.
    result = subprocess.run([str(BIN / "replyx"), "check"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  postgres ")
    assert lines[1].split() == ["hint:", *report["checks"][0]["hint"].split()]
    assert lines[-1] == "replyx check: 5 of 10 checks failed"
    # It only looks: no embedded Postgres was created or started.
    assert not EmbeddedPostgres(tmp_path / "var").is_running()
    assert not (tmp_path / "var" / "pg").exists()
