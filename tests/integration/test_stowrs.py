"""STOW-RS delivery and QIDO-RS read-back against a real Orthanc (DICOMweb plugin)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai_node.config import Destination, NodeSettings
from dicom_ai_node.deliver.stowrs import find_sop_instances, store_instances
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_ai_node.node import build_services, build_workers


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start("AINODE", free_port())
    try:
        yield server
    finally:
        server.stop()


def test_stow_then_qido_finds_every_instance(orthanc: OrthancServer, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=3)
    report = store_instances(orthanc.dicomweb_url, files)
    first = dcmread(files[0], stop_before_pixels=True)
    expected = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(report.sent) == expected
    held = find_sop_instances(orthanc.dicomweb_url, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    assert held == expected
    # Idempotent: the same UIDs again are stored once.
    store_instances(orthanc.dicomweb_url, files)
    assert len(orthanc.series_by_modality(str(first.StudyInstanceUID), "CT")[0]["Instances"]) == 3


def test_deliver_job_to_a_dicomweb_destination_is_verified(
    orthanc: OrthancServer, node_settings: NodeSettings, tmp_path: Path
) -> None:
    settings = node_settings.model_copy(
        update={"destinations": [Destination(name="web", type="dicomweb", url=orthanc.dicomweb_url)]}
    )
    services = build_services(settings, migrate="upgrade")
    files = write_ct_series(tmp_path / "res", n_slices=2)
    rels = [services.spool.commit_file(p, "results") for p in files]
    job_id = services.queue.enqueue(JobKind.DELIVER, {"destination": "web", "files": rels})
    [worker] = build_workers(services, [JobKind.DELIVER])
    worker.run_one()
    job = services.queue.get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED, job.last_error if job else None
    assert job.result is not None and job.result["verified"] is True and len(job.result["sent"]) == 2


def test_wrong_path_is_permanent_and_closed_port_is_transient(orthanc: OrthancServer, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    with pytest.raises(PermanentDeliveryError, match="HTTP 404"):
        store_instances(orthanc.http_url + "/no-such-dicom-web", files)
    with pytest.raises(TransientDeliveryError, match="cannot reach"):
        store_instances(f"http://127.0.0.1:{free_port()}/dicom-web", files, timeout_s=5)


def test_instance_the_pacs_refuses_is_a_permanent_failure(orthanc: OrthancServer, tmp_path: Path) -> None:
    """Orthanc answers HTTP 400 to an instance without a Series Instance UID: never 'delivered', no retry."""
    [path] = write_ct_series(tmp_path / "ct", n_slices=1)
    ds = dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PermanentDeliveryError, match="HTTP 400"):
        store_instances(orthanc.dicomweb_url, [path])
