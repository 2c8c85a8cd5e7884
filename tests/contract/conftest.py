"""Fixtures for the persistence contract suite: every test runs on SQLite and on PostgreSQL.

PostgreSQL: a throwaway database ``ainode_test_<random>`` is created on the server named by
AINODE_TEST_POSTGRES_URL (default: the local trust-auth server, maintenance database ``test``) and dropped
at the end of the session. If the server is unreachable the PostgreSQL tests FAIL, unless
AINODE_SKIP_POSTGRES=1 is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_ai_node.persistence import create_schema, make_engine
from dicom_ai_node.persistence.tables import metadata


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
