"""C-STORE SCU delivery and the deliver job's retry / dead-letter behaviour, against real DCMTK peers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai_node.config import Destination
from dicom_ai_node.deliver.dimse import DicomPeer, echo, send_files
from dicom_ai_node.devtools.dcmtk import storescp
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_ai_node.node import build_services, build_workers
from tests.conftest import free_port


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "received"
    with storescp(out) as port:
        yield port, out


def test_send_files_to_storescp(pacs: tuple[int, Path], tmp_path: Path) -> None:
    port, out = pacs
    files = write_ct_series(tmp_path / "ct", n_slices=5)
    seen: list[int] = []
    report = send_files(files, DicomPeer("PACS", "127.0.0.1", port), lambda _p, n: seen.append(n))
    assert len(report.sent) == 5 and seen == [1, 2, 3, 4, 5]
    received = {str(dcmread(f).SOPInstanceUID) for f in out.iterdir()}
    assert received == {str(dcmread(f).SOPInstanceUID) for f in files}
    assert echo(DicomPeer("PACS", "127.0.0.1", port)) == 0


def test_closed_port_is_transient(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    with pytest.raises(TransientDeliveryError):
        send_files(files, DicomPeer("PACS", "127.0.0.1", free_port(), timeout_s=5))


def test_rejected_association_is_permanent(running_scp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    with pytest.raises(PermanentDeliveryError, match="rejected"):
        send_files(files, DicomPeer("AINODE", "127.0.0.1", running_scp.port, calling_ae_title="NOT_ALLOWED"))


def _deliver_job(node_settings, tmp_path: Path, port: int, calling: str = "TESTSCU"):  # type: ignore[no-untyped-def]
    settings = node_settings.model_copy(
        update={
            "destinations": [
                Destination(
                    name="pacs",
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=port,
                    calling_ae_title=calling,
                    timeout_s=5,
                    verify=False,  # storescp has no C-FIND
                )
            ],
        }
    )
    settings.worker.max_attempts = 3
    services = build_services(settings, migrate="upgrade")
    src = write_ct_series(tmp_path / "res", n_slices=2)
    rels = [services.spool.commit_file(p, "results") for p in src]
    job_id = services.queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": rels}, max_attempts=3)
    [worker] = build_workers(services, [JobKind.DELIVER])
    return services, worker, job_id


def test_deliver_job_retries_with_backoff_then_dead_letter_then_replay(node_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services, worker, job_id = _deliver_job(node_settings, tmp_path, free_port())
    assert worker.run_one() is not None
    job = services.queue.get(job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 1
    assert "cannot associate" in job.last_error
    assert worker.run_one() is None  # backoff: not runnable yet
    # Exhaust the attempts, moving each backoff deadline into the past instead of waiting for it.
    for _ in range(3):
        with services.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE jobs SET scheduled_at = '2000-01-01 00:00:00.000000' WHERE id = ?", (job_id,)
            )
        worker.run_one()
        if services.queue.get(job_id).status == JobStatus.DEAD:
            break
    assert services.queue.get(job_id).status == JobStatus.DEAD
    assert services.queue.retry(job_id)
    assert services.queue.get(job_id).status == JobStatus.QUEUED


def test_deliver_job_succeeds_against_a_real_peer(node_settings, tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    port, out = pacs
    services, worker, job_id = _deliver_job(node_settings, tmp_path, port)
    worker.run_one()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.last_error
    assert len(job.result["sent"]) == 2 and len(list(out.iterdir())) == 2


def test_rejection_goes_straight_to_dead_letter(node_settings, tmp_path: Path, running_scp) -> None:  # type: ignore[no-untyped-def]
    services, worker, job_id = _deliver_job(node_settings, tmp_path, running_scp.port, calling="NOT_ALLOWED")
    worker.run_one()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.DEAD and job.attempts == 1
    assert "rejected" in job.last_error


def test_result_files_gone_from_the_spool_is_a_clear_dead_letter(node_settings, tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    """Retention removed the results (or someone deleted them): no association, a message that says why."""
    port, out = pacs
    services, worker, job_id = _deliver_job(node_settings, tmp_path, port)
    services.spool.path(services.queue.get(job_id).payload["files"][0]).unlink()
    worker.run_one()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.DEAD and job.attempts == 1
    assert (
        "1 of 2 result files are no longer in the spool" in job.last_error and "retention" in job.last_error
    )
    assert list(out.iterdir()) == []
