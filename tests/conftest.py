"""Shared fixtures: free ports, node settings on a temp spool + SQLite, an in-process SCP."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_ai_node.config import AllowedPeer, NodeSettings


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


@pytest.fixture
def running_scp(node_settings: NodeSettings) -> Iterator[object]:
    from dicom_ai_node.node import build_services
    from dicom_ai_node.receive.scp import StorageSCP

    services = build_services(node_settings)
    scp = StorageSCP(node_settings, services.spool, services.repo)
    scp.start()
    scp.services = services  # type: ignore[attr-defined]
    try:
        yield scp
    finally:
        scp.stop()
