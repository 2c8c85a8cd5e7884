"""Fixtures for the persistence contract suite: every test runs on SQLite and on PostgreSQL.

PostgreSQL: a throwaway database ``ainode_test_<random>`` is created on the server named by
AINODE_TEST_POSTGRES_URL (default: the local trust-auth server, maintenance database ``test``) and dropped
at the end of the session. If the server is unreachable the PostgreSQL tests FAIL, unless
AINODE_SKIP_POSTGRES=1 is set.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_ai_node.persistence import create_schema, make_engine
from dicom_ai_node.persistence.tables import metadata

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class FakeClock:
    """A clock tests move by hand, so backoff and leases are tested without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _admin_engine() -> sa.Engine:
    url = os.environ.get("AINODE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    return sa.create_engine(
        make_engine(url).url,  # same URL normalisation as the node (postgresql:// -> psycopg)
        isolation_level="AUTOCOMMIT",  # CREATE/DROP DATABASE cannot run in a transaction
        connect_args={"connect_timeout": 5},
        poolclass=sa.pool.NullPool,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    admin = _admin_engine()
    unreachable = ""
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        unreachable = (
            f"PostgreSQL at {admin.url.render_as_string(hide_password=True)} unreachable: {exc.orig}"
        )
    if unreachable:
        if os.environ.get("AINODE_SKIP_POSTGRES") == "1":
            pytest.skip(unreachable)
        pytest.fail(
            f"{unreachable}\nStart PostgreSQL or set AINODE_SKIP_POSTGRES=1 to skip these tests.",
            pytrace=False,
        )
    name = f"ainode_test_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'db' / 'node.db'}")
        create_schema(eng)
    else:
        eng = make_engine(request.getfixturevalue("postgres_url"))
        table_names = ", ".join(t.name for t in metadata.sorted_tables)
        with eng.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {table_names} RESTART IDENTITY CASCADE"))
    try:
        yield eng
    finally:
        eng.dispose()
