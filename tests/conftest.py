"""Shared fixtures: free ports, node settings on a temp spool + SQLite, an in-process SCP."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from dicom_ai_node.config import AllowedPeer, NodeSettings
from dicom_ai_node.persistence.db import create_schema, make_engine

if TYPE_CHECKING:
    from dicom_ai_node.node import Services
    from dicom_ai_node.receive.scp import StorageSCP

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def node_settings(tmp_path: Path) -> NodeSettings:
    return NodeSettings(
        ae_title="AINODE",
        dicom={
            "bind": "127.0.0.1",
            "port": free_port(),
            "allowed_peers": [
                AllowedPeer(ae_title="STORESCU"),
                AllowedPeer(ae_title="TESTSCU", hosts=["127.0.0.1"]),
            ],
        },
        spool_dir=tmp_path / "spool",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        disk_reserve_mb=0,
        quiet_period_s=0.5,
        rules_file=Path(__file__).parents[1] / "config" / "rules.yaml",
    )


@dataclass(frozen=True)
class RunningScp:
    """The in-process StorageSCP of the `running_scp` fixture and the services it stores into."""

    scp: StorageSCP
    services: Services

    @property
    def port(self) -> int:
        return self.scp.port


@pytest.fixture
def running_scp(node_settings: NodeSettings) -> Iterator[RunningScp]:
    from dicom_ai_node.node import build_services
    from dicom_ai_node.receive.scp import StorageSCP

    services = build_services(node_settings, migrate="upgrade")
    scp = StorageSCP(node_settings, services.spool, services.repo)
    scp.start()
    try:
        yield RunningScp(scp, services)
    finally:
        scp.stop()


def _admin_engine() -> sa.Engine:
    url = os.environ.get("AINODE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    return sa.create_engine(
        make_engine(url).url,  # same URL normalisation as the node (postgresql:// -> psycopg)
        isolation_level="AUTOCOMMIT",  # CREATE/DROP DATABASE cannot run in a transaction
        connect_args={"connect_timeout": 5},
        poolclass=sa.pool.NullPool,
    )


def _require_postgres(admin: sa.Engine) -> None:
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


def _throwaway_database() -> Iterator[str]:
    """A new database `ainode_test_<random>` with the schema, dropped afterwards."""
    admin = _admin_engine()
    _require_postgres(admin)
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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One database for the whole session (the contract suite truncates its tables per test)."""
    yield from _throwaway_database()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A database of its own, for a test that runs the node against PostgreSQL."""
    yield from _throwaway_database()
