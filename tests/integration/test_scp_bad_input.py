"""Bad input over C-STORE, against the real StorageSCP on loopback: every instance of the bad-input corpus
(tests/support/bad_input.py) gets its own failure status, one log line naming the SOP Instance UID and
the peer, nothing in the spool or the database, and the node keeps serving. The called AE title is
checked at association (DCMTK storescu and pynetdicom)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.receive.scp import StorageSCP
from tests.conftest import RunningScp
from tests.support.bad_input import CASES, LONG_UID, bad_instance, ct_dataset, storescu_once, write_part10

INGEST_LOGGER = "dicom_ai_node.receive.ingest"


def _associate(port: int, called: str = "AINODE") -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _send_file(port: int, path: Path) -> int:
    """C-STORE `path` as it is: the request's UIDs are its File Meta Information's."""
    assoc = _associate(port)
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    return int(status.Status)


def _nothing_kept(running_scp: RunningScp, series_instance_uid: str) -> None:
    services = running_scp.services
    assert list((services.spool.root / "instances").rglob("*")) == []
    assert list(services.spool.incoming.iterdir()) == []
    assert services.repo.get_series(series_instance_uid) is None
    assert services.repo.count_series() == 0


def _keeps_serving(running_scp: RunningScp, tmp_path: Path) -> None:
    ds = ct_dataset(tmp_path / "good")
    assoc = _associate(running_scp.port)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert running_scp.services.repo.get_series(str(ds.SeriesInstanceUID)) is not None


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_instance_gets_its_status_one_log_line_and_nothing_is_kept(
    name: str, running_scp: RunningScp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = bad_instance(name, tmp_path / "corpus")
    caplog.set_level(logging.INFO)
    status = _send_file(running_scp.port, bad.path)
    assert status == bad.c_store_status, f"{name}: 0x{status:04X}"
    refusals = [r for r in caplog.records if r.name == INGEST_LOGGER and "rejected SOP" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    line = refusals[0].getMessage()
    assert bad.announced_sop_instance_uid in line and "TESTSCU (127.0.0.1)" in line
    assert f"0x{bad.c_store_status:04X}" in line
    # No traceback, no handler exception: the refusal is the node's own answer.
    assert not any(r.exc_info for r in caplog.records)
    assert len(caplog.records) < 40, f"{len(caplog.records)} log records for one instance"
    _nothing_kept(running_scp, bad.series_instance_uid)
    _keeps_serving(running_scp, tmp_path)


def test_pixel_data_longer_than_needed_is_stored(running_scp: RunningScp, tmp_path: Path) -> None:
    """Only shorter Pixel Data is refused: padding passes. (Compressed transfer syntaxes are not
    checked: test_scp.py's test_every_transfer_syntax_is_stored_byte_for_byte_as_received.)"""
    ds = ct_dataset(tmp_path / "ct")
    ds.PixelData = ds.PixelData + b"\x00\x00"
    padded = write_part10(tmp_path / "padded.dcm", ds)
    assert _send_file(running_scp.port, padded) == 0x0000


def test_dcmtk_storescu_with_an_overlong_uid_is_refused_and_nothing_stored(
    running_scp: RunningScp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DCMTK cuts the request's Affected SOP Instance UID to 64 characters and sends the data set as it
    is: the data set's 72-character UID is not a valid UID (and not the announced one)."""
    ds = ct_dataset(tmp_path / "ct")
    ds.SOPInstanceUID = LONG_UID
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = storescu_once(running_scp.port, path)
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in proc.stdout + proc.stderr
    assert any("0xA900" in r.getMessage() and "STORESCU" in r.getMessage() for r in caplog.records)
    _nothing_kept(running_scp, str(ds.SeriesInstanceUID))


def test_a_wrong_called_ae_is_rejected_with_reason_7(running_scp: RunningScp) -> None:
    assoc = _associate(running_scp.port, called="WRONG")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive is not None
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x07)
    ok = _associate(running_scp.port)
    assert ok.is_established
    ok.release()


def test_dcmtk_storescu_with_a_wrong_called_ae_is_refused(
    running_scp: RunningScp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = ct_dataset(tmp_path / "ct")
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = storescu_once(running_scp.port, path, called="WRONG")
    assert proc.returncode != 0
    assert "called ae title not recognized" in (proc.stdout + proc.stderr).lower(), proc.stderr
    assert "called AE 'WRONG' is not this node's 'AINODE'" in caplog.text
    assert running_scp.services.repo.get_series(str(ds.SeriesInstanceUID)) is None


def test_accept_any_called_ae_lets_a_wrong_called_ae_store(
    node_settings: NodeSettings, tmp_path: Path
) -> None:
    from dicom_ai_node.node import build_services

    settings = node_settings.model_copy(
        update={"dicom": node_settings.dicom.model_copy(update={"accept_any_called_ae": True})}
    )
    services = build_services(settings, migrate="upgrade")
    scp = StorageSCP(settings, services.spool, services.repo)
    scp.start()
    try:
        ds = ct_dataset(tmp_path / "ct")
        assoc = _associate(scp.port, called="SOMEPACSNAME")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        path = tmp_path / "ct2.dcm"
        other = ct_dataset(tmp_path / "ct2")
        other.save_as(path, enforce_file_format=True)
        proc = storescu_once(scp.port, path, called="WRONG")
        assert proc.returncode == 0, proc.stderr
        assert services.repo.get_series(str(other.SeriesInstanceUID)) is not None
    finally:
        scp.stop()
