"""The real StorageSCP with NodeMetrics: counters move by exactly what was sent (DCMTK storescu, pynetdicom)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.node import Services, build_services
from dicom_ai_node.receive.scp import StorageSCP


@pytest.fixture
def scp_with_metrics(node_settings: NodeSettings) -> Iterator[tuple[StorageSCP, Services, NodeMetrics]]:
    services = build_services(node_settings, migrate="upgrade")
    metrics = NodeMetrics(job_counts=services.queue.counts)
    scp = StorageSCP(node_settings, services.spool, services.repo, metrics=metrics)
    scp.start()
    try:
        yield scp, services, metrics
    finally:
        scp.stop()


def _send_one(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_counters_move_by_exactly_what_was_sent(scp_with_metrics, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scp, services, metrics = scp_with_metrics
    value = metrics.registry.get_sample_value
    files = write_ct_series(tmp_path / "ct", n_slices=4)
    storescu(files, "AINODE", scp.port, "STORESCU")
    storescu(files[:1], "AINODE", scp.port, "STORESCU")  # a duplicate: answered Success, kept once

    bad = dcmread(write_ct_series(tmp_path / "bad", n_slices=1)[0])
    del bad.SeriesInstanceUID
    assert _send_one(scp.port, bad) == 0xA900

    assert value("ainode_cstore_responses_total", {"status": "0x0000"}) == 5
    assert value("ainode_cstore_responses_total", {"status": "0xA900"}) == 1
    assert value("ainode_instances_received_total") == 5
    # Bytes as received: the stored spool files (the duplicate arrived with the same bytes as the first).
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    stored = services.repo.instances_of_series(series_uid)
    assert len(stored) == 4
    sizes = {i.sop_instance_uid: services.spool.path(i.spool_path).stat().st_size for i in stored}
    first_uid = str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    assert value("ainode_received_bytes_total") == sum(sizes.values()) + sizes[first_uid]


def test_disk_under_reserve_is_counted_as_a700(node_settings: NodeSettings, tmp_path: Path) -> None:
    settings = node_settings.model_copy(update={"disk_reserve_mb": 10**9})
    services = build_services(settings, migrate="upgrade")
    metrics = NodeMetrics()
    scp = StorageSCP(settings, services.spool, services.repo, metrics)
    scp.start()
    try:
        ds = dcmread(write_ct_series(tmp_path / "ct", n_slices=1)[0])
        assert _send_one(scp.port, ds) == 0xA700
    finally:
        scp.stop()
    value = metrics.registry.get_sample_value
    assert value("ainode_cstore_responses_total", {"status": "0xA700"}) == 1
    assert value("ainode_cstore_responses_total", {"status": "0x0000"}) is None
    assert value("ainode_instances_received_total") == 0
    assert value("ainode_received_bytes_total") == 0


def test_a_raising_handler_is_counted_as_c211(scp_with_metrics, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    scp, services, metrics = scp_with_metrics

    def broken(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(services.repo, "record_instance", broken)
    ds = dcmread(write_ct_series(tmp_path / "ct", n_slices=1)[0])
    assert _send_one(scp.port, ds) == 0xC211
    assert metrics.registry.get_sample_value("ainode_cstore_responses_total", {"status": "0xC211"}) == 1
    assert metrics.registry.get_sample_value("ainode_instances_received_total") == 0


def test_scp_without_metrics_still_serves(node_settings: NodeSettings, tmp_path: Path) -> None:
    services = build_services(node_settings, migrate="upgrade")
    scp = StorageSCP(node_settings, services.spool, services.repo)
    scp.start()
    try:
        assert scp.ctx.metrics is None
        files = write_ct_series(tmp_path / "ct", n_slices=1)
        storescu(files, "AINODE", scp.port, "STORESCU")
    finally:
        scp.stop()
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    row = services.repo.get_series(series_uid)
    assert row is not None and row.instance_count == 1
