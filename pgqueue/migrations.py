"""Find, order, substitute and apply the SQL migrations in ``sql/migrations``.

Each migration runs in its own transaction together with its row in
``<schema>.migrations``, under an advisory lock, so concurrent ``pgqueue
migrate`` runs apply each file once and re-running is a no-op.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from pgqueue.errors import ConfigurationError, SchemaOutOfDate

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    text: str

    def render(self, schema: str) -> str:
        """Return the SQL with the schema and channel placeholders filled in."""
        return render(self.text, schema)


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain lower-case identifier, else raise."""
    if not isinstance(schema, str) or not SCHEMA_NAME.fullmatch(schema):
        # (fullmatch: match() took "pgqueue\n")
        raise ConfigurationError(
            f"invalid schema name {schema!r}: use lower-case letters, digits and _"
        )
    if schema.startswith("pg_") or schema == "information_schema":
        raise ConfigurationError(f"schema {schema!r} is PostgreSQL's own: pick another")
    return schema


def render(text: str, schema: str) -> str:
    """Substitute ``:pgqueue_schema`` and ``:pgqueue_channel`` in SQL text."""
    check_schema_name(schema)
    ident = '"' + schema + '"'
    channel = "'" + schema + "'"
    return text.replace(":pgqueue_schema", ident).replace(":pgqueue_channel", channel)


def _migration_dir() -> Path:
    packaged = resources.files("pgqueue") / "sql" / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "sql" / "migrations"
    if checkout.is_dir():
        return checkout
    raise ConfigurationError("pgqueue's SQL files are missing from this install")


def load() -> list[Migration]:
    """Return every migration, in version order."""
    found = []
    for path in sorted(_migration_dir().iterdir()):
        match = _FILE_NAME.match(path.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), path.read_text("utf-8"))
            )
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ConfigurationError(f"migration numbers are not 1..n: {versions}")
    return found


def latest_version() -> int:
    """The schema version this code expects."""
    return len(load())


def _bootstrap(schema: str) -> str:
    return render(
        "create schema if not exists :pgqueue_schema;\n"
        "create table if not exists :pgqueue_schema.migrations (\n"
        "    version    integer primary key,\n"
        "    name       text not null,\n"
        "    applied_at timestamptz not null default now()\n"
        ");\n",
        schema,
    )


def script(schema: str = "pgqueue") -> str:
    """The whole migration as one SQL script, for DBAs who apply SQL themselves."""
    parts = [f"-- pgqueue schema {schema!r}, version {latest_version()}\n"]
    parts.append(_bootstrap(schema))
    for migration in load():
        parts.append(f"\n-- {migration.version:04d}_{migration.name}\nbegin;\n")
        parts.append(migration.render(schema))
        parts.append(
            render(
                f"\ninsert into :pgqueue_schema.migrations (version, name) "
                f"values ({migration.version}, '{migration.name}');\ncommit;\n",
                schema,
            )
        )
    return "".join(parts)


def current_version(conn: psycopg.Connection, schema: str = "pgqueue") -> int:
    """The highest migration applied in ``schema`` (0 when none)."""
    check_schema_name(schema)
    row = conn.execute(
        "select to_regclass(%s) is not null", [f'"{schema}".migrations']
    ).fetchone()
    if not row or not row[0]:
        return 0
    query = sql.SQL("select coalesce(max(version), 0) from {}.migrations").format(
        sql.Identifier(schema)
    )
    version = conn.execute(query).fetchone()
    return int(version[0]) if version else 0


def check_up_to_date(conn: psycopg.Connection, schema: str = "pgqueue") -> None:
    """Raise :class:`SchemaOutOfDate` unless every migration is applied."""
    have, want = current_version(conn, schema), latest_version()
    if have < want:
        raise SchemaOutOfDate(
            f"schema {schema!r} is at version {have}, this pgqueue needs {want}: "
            f"run `pgqueue migrate`"
        )


def migrate(
    conn: psycopg.Connection,
    schema: str = "pgqueue",
    *,
    target: int | None = None,
    on_applied: Callable[[Migration], None] | None = None,
) -> list[Migration]:
    """Apply pending migrations; return the ones applied (empty when up to date).

    ``conn`` must be in autocommit mode: each migration commits on its own,
    and ``on_applied`` hears of each as it commits (those before one that
    fails stay applied). ``target`` stops after that version (default: the
    latest), as when a schema is upgraded one release at a time.
    """
    check_schema_name(schema)
    if target is not None and not 0 <= target <= latest_version():
        raise ConfigurationError(
            f"target must be a version from 0 to {latest_version()}, got {target}"
        )
    if not conn.autocommit:
        raise ConfigurationError("migrate needs an autocommit connection")
    lock = ["pgqueue.migrate." + schema]
    conn.execute("select pg_advisory_lock(hashtext(%s))", lock)
    try:
        exists = conn.execute(
            "select 1 from pg_namespace where nspname = %s", [schema]
        ).fetchone()
        table = conn.execute(
            "select to_regclass(%s)", [f"{schema}.migrations"]
        ).fetchone()
        if not exists:
            conn.execute(_bootstrap(schema).encode())
        elif table is None or table[0] is None:
            # The schema's owner may lack CREATE on the database: only the
            # table. (Not when it exists: a role without CREATE on the schema,
            # a worker's, may run migrate to find the schema up to date.)
            conn.execute(_bootstrap(schema).split(";\n", 1)[1].encode())
        applied = []
        have = current_version(conn, schema)
        record = sql.SQL("insert into {}.migrations (version, name) values (%s, %s)")
        for migration in load():
            if migration.version <= have:
                continue
            if target is not None and migration.version > target:
                break
            with conn.transaction():
                conn.execute(migration.render(schema).encode())
                conn.execute(
                    record.format(sql.Identifier(schema)),
                    [migration.version, migration.name],
                )
            applied.append(migration)
            if on_applied is not None:
                on_applied(migration)
        return applied
    finally:
        conn.execute("select pg_advisory_unlock(hashtext(%s))", lock)
