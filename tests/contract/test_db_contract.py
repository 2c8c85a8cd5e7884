"""Engine factory: SQLite durability settings, URL handling, schema creation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_ai_node.errors import ConfigError
from dicom_ai_node.persistence import create_schema, is_postgres, make_engine


def test_sqlite_engine_is_durable_and_creates_its_directory(tmp_path: Path) -> None:
    db_file = tmp_path / "var" / "lib" / "node.db"
    engine = make_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30000, "foreign_keys": 1}
        assert db_file.exists()
        assert is_postgres(engine) is False
    finally:
        engine.dispose()


def test_sqlite_transactions_begin_immediate(tmp_path: Path) -> None:
    """A transaction holds the write lock from its start, so writers queue instead of failing."""
    db_file = tmp_path / "node.db"
    engine = make_engine(f"sqlite:///{db_file}")
    create_schema(engine)
    other = sqlite3.connect(db_file, timeout=0, isolation_level=None)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again after commit
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_create_schema_is_idempotent(engine: sa.Engine) -> None:
    create_schema(engine)
    create_schema(engine)
    names = set(sa.inspect(engine).get_table_names())
    assert {"instances", "series", "jobs", "results"} <= names


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://postgres@127.0.0.1:5432/x", "postgresql+psycopg"),
        ("postgresql+psycopg://postgres@127.0.0.1/x", "postgresql+psycopg"),
        ("postgres://postgres@127.0.0.1/x", "postgresql+psycopg"),
    ],
)
def test_postgres_urls_use_psycopg(url: str, driver: str) -> None:
    engine = make_engine(url)  # no connection is made here
    assert engine.url.drivername == driver and is_postgres(engine)
    engine.dispose()


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///:memory:", "mysql://root@localhost/x", "postgresql+psycopg2://h/x", "nope"],
)
def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="database.url"):
        make_engine(url)
