"""Worker metrics over a real series: SCP -> infer (tiny model in the inference host) -> deliver to storescp.

Stage durations per model, delivery duration / failures per destination, receive -> delivered latency and
finished jobs move by exactly one per job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

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
from tests.conftest import free_port
from tests.support.host_models import tiny_registry


@pytest.fixture(scope="module")
def host() -> Iterator[InferenceHost]:
    with InferenceHost("cpu", [], timeout_s=60, registry_factory=tiny_registry) as shared:
        yield shared


def _node(node_settings: NodeSettings, pacs_port: int) -> tuple[NodeSettings, Services]:
    settings = node_settings.model_copy(
        update={
            "destinations": [
                Destination(
                    name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port, timeout_s=5, verify=False
                )
            ]
        }
    )
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


def _receive_series(settings: NodeSettings, services: Services, metrics: NodeMetrics, tmp_path: Path) -> str:
    scp = StorageSCP(settings, services.spool, services.repo, metrics)
    scp.start()
    try:
        files = write_ct_series(tmp_path / "ct", n_slices=3)
        storescu(files, "AINODE", scp.port, "STORESCU")
    finally:
        scp.stop()
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


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
    )


def test_a_series_through_infer_and_deliver_moves_each_metric_once(
    node_settings: NodeSettings, host: InferenceHost, tmp_path: Path
) -> None:
    with storescp(tmp_path / "pacs") as pacs_port:
        settings, services = _node(node_settings, pacs_port)
        metrics = NodeMetrics(job_counts=services.queue.counts, queue_stats=services.queue.stats)
        value = metrics.registry.get_sample_value
        series_uid = _receive_series(settings, services, metrics, tmp_path)
        workers = _workers(settings, services, host, metrics)
        infer_id = _infer_job(services, series_uid)
        assert value("ainode_queue_depth", {"kind": "infer"}) == 1

        assert workers[JobKind.INFER].run_one() is not None
        infer = services.queue.get(infer_id)
        assert infer is not None
        assert infer.status == JobStatus.SUCCEEDED, infer.last_error
        for stage in ("load", "infer", "encode"):
            assert value("ainode_stage_duration_seconds_count", {"stage": stage, "model": "threshold"}) == 1
        assert value("ainode_jobs_finished_total", {"kind": "infer", "status": "succeeded"}) == 1
        assert value("ainode_queue_depth", {"kind": "deliver"}) == 1

        assert workers[JobKind.DELIVER].run_one() is not None
    [deliver] = services.queue.list_jobs(kind=JobKind.DELIVER)
    assert deliver.status == JobStatus.SUCCEEDED, deliver.last_error
    assert value("ainode_delivery_duration_seconds_count", {"destination": "pacs"}) == 1
    assert value("ainode_delivery_failures_total", {"destination": "pacs"}) is None
    assert value("ainode_receive_to_delivered_seconds_count") == 1
    # The series arrived seconds ago in this test, not hours.
    turnaround_s = value("ainode_receive_to_delivered_seconds_sum")
    assert turnaround_s is not None and 0 < turnaround_s < 120
    assert value("ainode_jobs_finished_total", {"kind": "deliver", "status": "succeeded"}) == 1
    assert value("ainode_jobs", {"kind": "deliver", "status": "succeeded"}) == 1
    assert value("ainode_queue_depth", {"kind": "deliver"}) == 0


def test_a_failed_delivery_counts_a_failure_and_no_latency(
    node_settings: NodeSettings, host: InferenceHost, tmp_path: Path
) -> None:
    settings, services = _node(node_settings, free_port())  # nothing listens there
    metrics = NodeMetrics()
    value = metrics.registry.get_sample_value
    series_uid = _receive_series(settings, services, metrics, tmp_path)
    workers = _workers(settings, services, host, metrics)
    _infer_job(services, series_uid)
    workers[JobKind.INFER].run_one()
    workers[JobKind.DELIVER].run_one()
    [deliver] = services.queue.list_jobs(kind=JobKind.DELIVER)
    assert deliver.status == JobStatus.FAILED and "cannot associate" in (deliver.last_error or "")
    assert value("ainode_delivery_failures_total", {"destination": "pacs"}) == 1
    assert value("ainode_delivery_duration_seconds_count", {"destination": "pacs"}) is None
    assert value("ainode_receive_to_delivered_seconds_count") == 0
    assert value("ainode_jobs_finished_total", {"kind": "deliver", "status": "failed"}) == 1


class _RefusesLabelmap:
    """A destination that refuses the first file set (as a PACS refusing the LABELMAP SEG) and holds what it got."""

    def __init__(self, refused: set[Path]) -> None:
        self.refused = refused
        self.sent: list[Path] = []

    def send(self, paths):  # type: ignore[no-untyped-def]
        from dicom_ai_node.deliver.dimse import StoreReport
        from dicom_ai_node.errors import PermanentDeliveryError

        if set(paths) & self.refused:
            raise PermanentDeliveryError("0x0122 SOP class not supported")
        self.sent += paths
        return StoreReport(sent=[str(p) for p in paths])

    def held(self, study_instance_uid: str, series_instance_uid: str) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.sent}


def test_a_fallback_delivery_is_one_success(
    node_settings: NodeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_ai_node.worker import stages

    settings, services = _node(node_settings, free_port())
    settings.destinations[0].verify = True
    metrics = NodeMetrics()
    first = [services.spool.commit_file(p, "results") for p in write_ct_series(tmp_path / "a", n_slices=1)]
    plain = [services.spool.commit_file(p, "results") for p in write_ct_series(tmp_path / "b", n_slices=2)]
    fake = _RefusesLabelmap({services.spool.path(r) for r in first})
    monkeypatch.setattr(stages, "deliverer_for", lambda dest, ae: fake)
    services.queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": first, "fallback_files": plain})
    worker = _workers(settings, services, None, metrics)[JobKind.DELIVER]  # type: ignore[arg-type]
    worker.run_one()
    [deliver] = services.queue.list_jobs(kind=JobKind.DELIVER)
    assert deliver.status == JobStatus.SUCCEEDED, deliver.last_error
    assert deliver.result is not None and deliver.result["fallback"] is True and deliver.result["verified"]
    assert fake.sent == [services.spool.path(r) for r in plain]
    value = metrics.registry.get_sample_value
    assert value("ainode_delivery_duration_seconds_count", {"destination": "pacs"}) == 1
    assert value("ainode_delivery_failures_total", {"destination": "pacs"}) is None
