"""The embedded server's socket directory in /tmp is private: whoever reaches it is superuser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replyx.pg import EmbeddedPostgres, EmbeddedPostgresError


def deep(tmp_path: Path) -> EmbeddedPostgres:
    embedded = EmbeddedPostgres(tmp_path / ("d" * 90))
    assert embedded.socket_dir != embedded.pgdata  # too long: the socket goes to /tmp
    return embedded


def test_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    embedded = deep(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    os.symlink(target, embedded.socket_dir)
    try:
        with pytest.raises(EmbeddedPostgresError, match="refusing socket directory"):
            embedded._private_socket_dir(embedded.socket_dir)
        assert oct(target.stat().st_mode & 0o777) == "0o755"  # not chmod-ed through the link
    finally:
        os.unlink(embedded.socket_dir)


def test_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    embedded = deep(tmp_path)
    embedded.socket_dir.mkdir(mode=0o777)
    os.chmod(embedded.socket_dir, 0o777)  # noqa: S103 (the mistake under test)
    try:
        with pytest.raises(EmbeddedPostgresError, match="refusing socket directory"):
            embedded._private_socket_dir(embedded.socket_dir)
    finally:
        embedded.socket_dir.rmdir()


def test_the_socket_path_is_measured_in_bytes(tmp_path: Path) -> None:
    # 45 Cyrillic letters: 45 characters, 90 bytes. Counting characters would keep the
    # socket there and overflow the 107-byte limit of a Unix socket path.
    embedded = EmbeddedPostgres(tmp_path / ("д" * 45))
    assert len(os.fsencode(embedded.pgdata / ".s.PGSQL.5432")) > 100
    assert embedded.socket_dir != embedded.pgdata
