"""A destination that stores but offers no query (issue 12): "delivered, not verified", never dead.

DCMTK's storescp stores what it is sent and refuses the Study Root C-FIND context of the read-back; a
DICOMweb service may accept STOW-RS and answer QIDO-RS with 405. With `verify: true` the deliver job
succeeds with `verified: false` and the reason; a read-back that runs and misses objects still retries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_ai_node.config import Destination, NodeSettings
from dicom_ai_node.deliver.dimse import STUDY_ROOT_FIND, StoreReport
from dicom_ai_node.deliver.stowrs import find_sop_instances
from dicom_ai_node.devtools.dcmtk import storescp
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import DeliverPayload
from dicom_ai_node.errors import QueryNotSupportedError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.node import Services, build_services
from dicom_ai_node.worker.context import StageContext
from dicom_ai_node.worker.runner import JobHandler, Worker
from dicom_ai_node.worker.stages import run_deliver


def _node(node_settings: NodeSettings, destination: Destination) -> tuple[NodeSettings, Services]:
    settings = node_settings.model_copy(update={"destinations": [destination]})
    return settings, build_services(settings, migrate="upgrade")


def _deliver_worker(settings: NodeSettings, services: Services, metrics: NodeMetrics) -> Worker:
    ctx = StageContext(settings, services.repo, services.queue, services.spool, None, "test", metrics)  # type: ignore[arg-type]
    handlers: dict[JobKind, JobHandler[Any]] = {
        JobKind.DELIVER: JobHandler(DeliverPayload, lambda job, payload: run_deliver(job, payload, ctx)),
    }
    return Worker(
        services.queue,
        handlers,
        [JobKind.DELIVER],
        lease_s=60,
        heartbeat_s=10,
        poll_interval_s=0.1,
        metrics=metrics,
    )


def _enqueue_results(services: Services, tmp_path: Path, destination: str) -> tuple[int, list[Path]]:
    files = write_ct_series(tmp_path / "results", n_slices=2)
    rels = [services.spool.commit_file(p, "results") for p in files]
    job_id = services.queue.enqueue(
        JobKind.DELIVER, {"destination": destination, "files": rels}, max_attempts=3
    )
    return job_id, [services.spool.path(r) for r in rels]


def test_storescp_with_verify_is_delivered_not_verified(node_settings: NodeSettings, tmp_path: Path) -> None:
    out = tmp_path / "pacs"
    with storescp(out) as port:
        destination = Destination(
            name="pacs", ae_title="PACS", host="127.0.0.1", port=port, timeout_s=5, verify=True
        )
        settings, services = _node(node_settings, destination)
        metrics = NodeMetrics()
        job_id, sent = _enqueue_results(services, tmp_path, "pacs")
        assert _deliver_worker(settings, services, metrics).run_one() is not None

    job = services.queue.get(job_id)
    assert job is not None
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1, job.last_error
    assert job.result is not None
    assert job.result["verified"] is False and len(job.result["sent"]) == 2
    reason = job.result["verify_error"]
    assert reason.startswith("pacs offers no query to read back with")
    assert STUDY_ROOT_FIND in reason and "accepts none of the proposed SOP classes" in reason
    stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    assert stored == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
    value = metrics.registry.get_sample_value
    assert value("ainode_deliveries_unverified_total", {"destination": "pacs"}) == 1
    assert value("ainode_delivery_failures_total", {"destination": "pacs"}) is None
    assert value("ainode_jobs_finished_total", {"kind": "deliver", "status": "succeeded"}) == 1


class _StowOnly(BaseHTTPRequestHandler):
    """STOW-RS answers "stored" (an empty PS3.18 response); every search is 405 Method Not Allowed."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep pytest output quiet
        pass


@pytest.fixture
def stow_only() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StowOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_a_dicomweb_service_without_qido_is_delivered_not_verified(
    node_settings: NodeSettings, tmp_path: Path, stow_only: str
) -> None:
    with pytest.raises(QueryNotSupportedError, match="QIDO-RS search at .* answered HTTP 405"):
        find_sop_instances(stow_only, "1.2.3", "1.2.3.4", timeout_s=5)
    destination = Destination(name="web", type="dicomweb", url=stow_only, timeout_s=5, verify=True)
    settings, services = _node(node_settings, destination)
    metrics = NodeMetrics()
    job_id, _ = _enqueue_results(services, tmp_path, "web")
    _deliver_worker(settings, services, metrics).run_one()
    job = services.queue.get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED, job.last_error if job else None
    assert job.result is not None and job.result["verified"] is False
    assert "HTTP 405" in job.result["verify_error"]
    value = metrics.registry.get_sample_value
    assert value("ainode_deliveries_unverified_total", {"destination": "web"}) == 1


class _ForgetfulPacs:
    """Stores nothing it is sent but answers the read-back: the objects are missing."""

    def send(self, paths: list[Path]) -> StoreReport:
        return StoreReport(sent=[str(p) for p in paths])

    def held(self, study_instance_uid: str, series_instance_uid: str) -> set[str]:
        return set()


def test_a_read_back_that_misses_objects_is_still_retried(
    node_settings: NodeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_ai_node.worker import stages

    destination = Destination(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=104, timeout_s=5, verify=True
    )
    settings, services = _node(node_settings, destination)
    monkeypatch.setattr(stages, "deliverer_for", lambda dest, ae: _ForgetfulPacs())
    metrics = NodeMetrics()
    job_id, _ = _enqueue_results(services, tmp_path, "pacs")
    _deliver_worker(settings, services, metrics).run_one()
    job = services.queue.get(job_id)
    assert job is not None and job.status == JobStatus.FAILED and job.attempts == 1
    error = job.last_error or ""
    assert error.startswith("TransientDeliveryError: read-back: pacs does not hold 2 of the 2 objects")
    value = metrics.registry.get_sample_value
    assert value("ainode_deliveries_unverified_total", {"destination": "pacs"}) is None
