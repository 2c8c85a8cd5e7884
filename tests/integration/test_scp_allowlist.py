"""The SCP's allow-list fails closed, and chunked receive writes into the spool without touching the
process-wide temp dir. Real associations from pynetdicom's AE as SCU against the running StorageSCP."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import dicom_ai_node.receive.ingest as ingest_module
from dicom_ai_node.config import NodeSettings
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.peers import AllowedPeer
from dicom_ai_node.node import build_services
from dicom_ai_node.receive import scp as scp_module
from dicom_ai_node.receive.allowlist import PeerAllowList
from dicom_ai_node.receive.scp import StorageSCP


def _associate(port: int, calling: str) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="AINODE")


def _started(settings: NodeSettings) -> tuple[StorageSCP, Any]:
    services = build_services(settings, migrate="upgrade")
    scp = StorageSCP(settings, services.spool, services.repo)
    scp.start()
    return scp, services


@pytest.fixture
def scp_factory(node_settings: NodeSettings) -> Iterator[Any]:
    started: list[StorageSCP] = []

    def start(settings: NodeSettings = node_settings) -> tuple[StorageSCP, Any]:
        scp, services = _started(settings)
        started.append(scp)
        return scp, services

    yield start
    for scp in started:
        scp.stop()


def test_allow_list_check_that_raises_rejects_the_association(
    scp_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: PeerAllowList, calling_ae: str, address: str) -> bool:
        raise RuntimeError("allow-list exploded")

    scp, _ = scp_factory()
    monkeypatch.setattr(PeerAllowList, "is_allowed", broken)
    assoc = _associate(scp.port, "TESTSCU")  # on the allow-list: only the broken check can refuse it
    assert assoc.is_rejected and not assoc.is_established
    assert "allow-list check failed" in caplog.text


def test_unknown_ae_is_rejected_even_when_the_handler_itself_cannot_run(
    scp_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crashing_handler(event: Event, allow_list: PeerAllowList) -> None:
        raise RuntimeError("handler exploded before any check")  # pynetdicom logs and swallows this

    monkeypatch.setattr(scp_module, "handle_requested", crashing_handler)
    scp, _ = scp_factory()
    # pynetdicom's own require_calling_aet refuses the unknown AE title; no node code runs for it.
    assert scp.ae.require_calling_aet == ["STORESCU", "TESTSCU"]
    assoc = _associate(scp.port, "INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    known = _associate(scp.port, "STORESCU")
    assert known.is_established
    known.release()


def test_empty_allow_list_admits_no_one(scp_factory: Any, node_settings: NodeSettings) -> None:
    settings = node_settings.model_copy(
        update={"dicom": node_settings.dicom.model_copy(update={"allowed_peers": []})}
    )
    scp, _ = scp_factory(settings)
    assoc = _associate(scp.port, "TESTSCU")
    assert assoc.is_rejected


def test_address_outside_the_peers_hosts_is_rejected(scp_factory: Any, node_settings: NodeSettings) -> None:
    peers = [AllowedPeer(ae_title="TESTSCU", hosts=["10.0.0.0/8"])]
    settings = node_settings.model_copy(
        update={"dicom": node_settings.dicom.model_copy(update={"allowed_peers": peers})}
    )
    scp, _ = scp_factory(settings)
    assoc = _associate(scp.port, "TESTSCU")  # the AE title is known, 127.0.0.1 is not in its hosts
    assert assoc.is_rejected


def test_chunked_receive_writes_in_the_spool_and_leaves_tempfile_alone(
    scp_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tempdir_before = tempfile.tempdir
    seen: list[Path] = []
    real_ingest = ingest_module.ingest_file

    def recording_ingest(tmp: Path, **kwargs: Any) -> Any:
        seen.append(tmp.parent)
        return real_ingest(tmp, **kwargs)

    monkeypatch.setattr(scp_module, "ingest_file", recording_ingest)
    scp, services = scp_factory()
    assert tempfile.tempdir == tempdir_before
    assert Path(tempfile.gettempdir()) != services.spool.incoming

    files = write_ct_series(tmp_path / "ct", n_slices=2)
    assoc = _associate(scp.port, "TESTSCU")
    statuses = [assoc.send_c_store(dcmread(f)).Status for f in files]
    assoc.release()

    assert statuses == [0x0000, 0x0000]
    assert seen == [services.spool.incoming, services.spool.incoming]
    assert list(services.spool.incoming.iterdir()) == []  # renamed into the spool, nothing left behind
    assert tempfile.tempdir == tempdir_before


def test_two_scps_in_one_process_each_receive_into_their_own_spool(
    scp_factory: Any, monkeypatch: pytest.MonkeyPatch, node_settings: NodeSettings, tmp_path: Path
) -> None:
    from dicom_ai_node.devtools.ports import free_port

    seen: list[Path] = []
    real_ingest = ingest_module.ingest_file

    def recording_ingest(tmp: Path, **kwargs: Any) -> Any:
        seen.append(tmp.parent)
        return real_ingest(tmp, **kwargs)

    monkeypatch.setattr(scp_module, "ingest_file", recording_ingest)
    first, first_services = scp_factory()
    other_settings = node_settings.model_copy(
        update={
            "dicom": node_settings.dicom.model_copy(update={"port": free_port()}),
            "spool_dir": tmp_path / "other-spool",
            "database_url": f"sqlite:///{tmp_path / 'other.db'}",
        }
    )
    second, second_services = scp_factory(other_settings)
    ds = dcmread(write_ct_series(tmp_path / "ct", n_slices=1)[0])
    for port in (first.port, second.port):
        assoc = _associate(port, "TESTSCU")
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    assert seen == [first_services.spool.incoming, second_services.spool.incoming]
