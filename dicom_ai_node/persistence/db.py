"""Engine factory for the two supported databases (DESIGN.md, "Queue and persistence").

SQLite is the embedded default: WAL, synchronous=FULL (a commit survives power loss), a long busy timeout,
foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE``. Without the last one, the sqlite3
driver starts a deferred transaction that upgrades to a write lock on the first write and can fail at once
with "database is locked", ignoring the busy timeout; with it, writers queue up behind each other.

PostgreSQL is the scale-out engine (several receivers and workers); the psycopg 3 driver is used.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url

from dicom_ai_node.errors import ConfigError
from dicom_ai_node.persistence.tables import metadata

SQLITE_BUSY_TIMEOUT_MS = 30_000
# UPDATE/INSERT ... RETURNING (used by the queue and repository) needs SQLite 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)
_URL_KEY = "database.url"


def make_engine(url: str) -> sa.Engine:
    """Create the engine for `url` (``sqlite:///path`` or ``postgresql[+psycopg]://...``).

    For SQLite the parent directory of the database file is created. In-memory SQLite is refused: the
    node only acknowledges what is durable, and an in-memory database is shared by no other connection.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(_URL_KEY, f"not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _make_sqlite_engine(parsed)
    if backend in ("postgresql", "postgres"):
        return _make_postgres_engine(parsed)
    raise ConfigError(_URL_KEY, f"unsupported database backend '{backend}' (use sqlite or postgresql)")


def create_schema(engine: sa.Engine) -> None:
    """Create missing tables and indexes; idempotent (alembic migrations will replace this)."""
    metadata.create_all(engine)


def is_postgres(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"


def is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _make_sqlite_engine(parsed: URL) -> sa.Engine:
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(_URL_KEY, f"unsupported SQLite driver '{parsed.drivername}' (use sqlite:///path)")
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ConfigError(_URL_KEY, "SQLite needs a database file path (sqlite:///path/to/node.db)")
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ConfigError(
            _URL_KEY,
            f"SQLite {sqlite3.sqlite_version} is too old; {'.'.join(map(str, MIN_SQLITE_VERSION))} needed",
        )
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        parsed,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver so that _on_begin decides how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _make_postgres_engine(parsed: URL) -> sa.Engine:
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername != "postgresql+psycopg":
        raise ConfigError(
            _URL_KEY, f"unsupported PostgreSQL driver '{parsed.drivername}' (use postgresql+psycopg)"
        )
    return sa.create_engine(parsed, pool_pre_ping=True)
