"""Series with empty or absent geometry attributes through the real SCP, worker, inference host (tiny
model) and a DCMTK storescp destination (issue 12).

A CT series without SliceThickness (Type 2) gets its SEG and SR delivered; one without
ImagePositionPatient is dead-lettered on its first attempt, before the model runs, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_ai_node.config import Destination, NodeSettings
from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import DeliverPayload, InferPayload
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.node import Services, build_services
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.worker.context import StageContext
from dicom_ai_node.worker.runner import JobHandler, Worker
from dicom_ai_node.worker.stages import run_deliver, run_infer
from tests.support.host_models import tiny_registry

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SPACING_MM = 1.5


@pytest.fixture(scope="module")
def host() -> Iterator[InferenceHost]:
    with InferenceHost("cpu", [], timeout_s=60, registry_factory=tiny_registry) as shared:
        yield shared


def _node(node_settings: NodeSettings, pacs_port: int) -> tuple[NodeSettings, Services]:
    destination = Destination(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port, timeout_s=5, verify=False
    )
    settings = node_settings.model_copy(update={"destinations": [destination]})
    return settings, build_services(settings, migrate="upgrade")


def _workers(
    settings: NodeSettings, services: Services, host: InferenceHost, metrics: NodeMetrics
) -> dict[JobKind, Worker]:
    ctx = StageContext(settings, services.repo, services.queue, services.spool, host, "test", metrics)
    handlers: dict[JobKind, JobHandler[Any]] = {
        JobKind.INFER: JobHandler(InferPayload, lambda job, payload: run_infer(job, payload, ctx)),
        JobKind.DELIVER: JobHandler(DeliverPayload, lambda job, payload: run_deliver(job, payload, ctx)),
    }
    return {
        kind: Worker(
            services.queue, handlers, [kind], lease_s=60, heartbeat_s=10, poll_interval_s=0.1, metrics=metrics
        )
        for kind in handlers
    }


def _receive(
    settings: NodeSettings,
    services: Services,
    metrics: NodeMetrics,
    tmp_path: Path,
    edit: Callable[[Dataset], None],
) -> str:
    """Write a 4-slice CT, apply `edit` to every instance, send it to the node's SCP; return its series UID."""
    files = write_ct_series(tmp_path / "ct", n_slices=4, slice_thickness=SPACING_MM)
    for path in files:
        ds = pydicom.dcmread(path)
        # Body (40 HU) at 1064, air at 24: the threshold model (> 100) finds the body, so a SEG is made.
        ds.RescaleIntercept = 0
        edit(ds)
        ds.save_as(path)
    scp = StorageSCP(settings, services.spool, services.repo, metrics)
    scp.start()
    try:
        storescu(files, "AINODE", scp.port, "STORESCU")
    finally:
        scp.stop()
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _infer_job(services: Services, series_uid: str) -> int:
    return services.queue.enqueue(
        JobKind.INFER,
        {
            "series_instance_uid": series_uid,
            "study_instance_uid": "1.2.3",
            "model": "threshold",
            "rule_id": "ct-test",
            "rule_version": 1,
            "destinations": ["pacs"],
            "generation": 1,
        },
        max_attempts=3,
    )


def _drop_slice_thickness(ds: Dataset) -> None:
    del ds.SliceThickness


def test_a_ct_series_without_slice_thickness_gets_seg_and_sr_delivered(
    node_settings: NodeSettings, host: InferenceHost, tmp_path: Path
) -> None:
    out = tmp_path / "pacs"
    with storescp(out) as pacs_port:
        settings, services = _node(node_settings, pacs_port)
        metrics = NodeMetrics()
        series_uid = _receive(settings, services, metrics, tmp_path, _drop_slice_thickness)
        workers = _workers(settings, services, host, metrics)
        infer_id = _infer_job(services, series_uid)

        assert workers[JobKind.INFER].run_one() is not None
        infer = services.queue.get(infer_id)
        assert infer is not None
        assert infer.status == JobStatus.SUCCEEDED, infer.last_error
        assert infer.result is not None and infer.result["volumes_cm3"]

        assert workers[JobKind.DELIVER].run_one() is not None
        [deliver] = services.queue.list_jobs(kind=JobKind.DELIVER)
        assert deliver.status == JobStatus.SUCCEEDED, deliver.last_error

    delivered = {str(ds.SOPClassUID): ds for ds in (pydicom.dcmread(p) for p in out.iterdir())}
    assert set(delivered) == {SEG_STORAGE, COMPREHENSIVE_SR}
    seg = delivered[SEG_STORAGE]
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series_uid
    thickness = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    assert float(thickness) == pytest.approx(SPACING_MM, abs=1e-3)


def test_a_ct_series_without_image_position_is_dead_at_once_before_the_model_runs(
    node_settings: NodeSettings, host: InferenceHost, tmp_path: Path
) -> None:
    out = tmp_path / "pacs"
    with storescp(out) as pacs_port:
        settings, services = _node(node_settings, pacs_port)
        metrics = NodeMetrics()

        def drop_position(ds: Dataset) -> None:
            del ds.ImagePositionPatient

        series_uid = _receive(settings, services, metrics, tmp_path, drop_position)
        workers = _workers(settings, services, host, metrics)
        infer_id = _infer_job(services, series_uid)
        assert workers[JobKind.INFER].run_one() is not None

    infer = services.queue.get(infer_id)
    assert infer is not None
    assert infer.status == JobStatus.DEAD and infer.attempts == 1
    error = infer.last_error or ""
    assert error.startswith(f"SeriesGeometryError: series {series_uid}: ImagePositionPatient is absent"), (
        error
    )
    assert "cannot be derived" in error
    value = metrics.registry.get_sample_value
    # Refused while loading the headers: no stage finished, the model never ran, nothing to deliver.
    assert value("ainode_stage_duration_seconds_count", {"stage": "infer", "model": "threshold"}) is None
    assert value("ainode_jobs_finished_total", {"kind": "infer", "status": "dead"}) == 1
    assert services.queue.list_jobs(kind=JobKind.DELIVER) == []
    assert list(out.iterdir()) == []
