"""An infer job that runs again (retried after a database outage, a lost lease or a crash; re-run by an
admin) stores its results under the same deterministic UIDs: the files are replaced in place, so no copy
is left in the spool that no row names, and deliveries queued by the earlier attempt still find their
files. A result whose row could not be written leaves no file behind either.

Found by tests/e2e/test_postgres_restart.py: a PostgreSQL restart between an infer job's result rows
and its success left the first attempt's SEG and SR files behind, named by no row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_ai_node.config import Destination, NodeSettings
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.payloads import DeliverPayload, InferPayload, parse_as
from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.node import Services, build_services
from dicom_ai_node.persistence.queue import Job
from dicom_ai_node.receive.ingest import ingest_file
from dicom_ai_node.worker.context import StageContext
from dicom_ai_node.worker.stages import run_infer
from tests.support.host_models import tiny_registry


@pytest.fixture
def stage(node_settings: NodeSettings) -> Iterator[tuple[Services, StageContext]]:
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1, verify=False)
    settings = node_settings.model_copy(update={"destinations": [destination]})
    services = build_services(settings, migrate="upgrade")
    # timeout 0: the tiny models run in this process.
    with InferenceHost("cpu", [], timeout_s=0, registry_factory=tiny_registry) as host:
        yield services, StageContext(settings, services.repo, services.queue, services.spool, host, "test")


def _series(services: Services, tmp_path: Path) -> str:
    """A 4-slice CT stored through the ingest path; returns its Series Instance UID."""
    files = write_ct_series(tmp_path / "ct", n_slices=4, rows=32, cols=32)
    for path in files:
        ds = pydicom.dcmread(path)
        # Body (40 HU) at 1064, air at 24: the threshold model (> 100) finds the body, so a SEG is made.
        ds.RescaleIntercept = 0
        received = services.spool.incoming / f"{path.stem}.part"
        ds.save_as(received, enforce_file_format=True)
        assert ingest_file(
            received, calling="TEST", spool=services.spool, repo=services.repo, reserve_bytes=0
        ).ok
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _claimed_infer_job(services: Services, series_uid: str) -> tuple[Job, InferPayload]:
    payload = InferPayload(
        series_instance_uid=series_uid,
        study_instance_uid="1.2.3",
        rule_id="ct",
        rule_version=1,
        model="threshold",
        destinations=["pacs"],
    )
    services.queue.enqueue(JobKind.INFER, payload)
    job = services.queue.claim("w1", [JobKind.INFER], 60)
    assert job is not None
    return job, payload


def _result_files(services: Services) -> set[str]:
    root = services.spool.root
    return {p.relative_to(root).as_posix() for p in (root / "results").rglob("*.dcm")}


def test_a_second_run_replaces_its_result_files_in_place(
    stage: tuple[Services, StageContext], tmp_path: Path
) -> None:
    services, ctx = stage
    series_uid = _series(services, tmp_path)
    job, payload = _claimed_infer_job(services, series_uid)
    first = run_infer(job, payload, ctx)
    rows = {r.sop_instance_uid: r.spool_path for r in services.repo.results_of_series(series_uid)}
    assert sorted(rows) == sorted(first["sop_instance_uids"]) and len(rows) == 2  # SEG + SR
    assert _result_files(services) == set(rows.values())

    # The same job again, as its next attempt after a lost lease: same UIDs, the same two files, every
    # row names one.
    second = run_infer(dataclasses.replace(job, attempts=job.attempts + 1), payload, ctx)
    assert second["sop_instance_uids"] == first["sop_instance_uids"]
    again = {r.sop_instance_uid: r.spool_path for r in services.repo.results_of_series(series_uid)}
    assert again == rows
    assert _result_files(services) == set(rows.values())
    for rel in rows.values():  # replaced with complete, readable objects
        ds = pydicom.dcmread(services.spool.path(rel))
        assert rows[str(ds.SOPInstanceUID)] == rel
    # The deliveries both attempts queued name files that are there.
    deliveries = [j for j in services.queue.list_jobs(limit=10) if j.kind == JobKind.DELIVER]
    assert len(deliveries) == 2
    for delivery in deliveries:
        files = parse_as(DeliverPayload, delivery.payload, job_id=delivery.id).files
        assert files and all(services.spool.path(f).is_file() for f in files)


def test_a_result_whose_row_cannot_be_written_leaves_no_file(
    stage: tuple[Services, StageContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, ctx = stage
    series_uid = _series(services, tmp_path)
    job, payload = _claimed_infer_job(services, series_uid)

    def database_down(**_: object) -> int:
        raise DatabaseError("database unavailable: connection refused")

    monkeypatch.setattr(services.repo, "add_result", database_down)
    with pytest.raises(DatabaseError):
        run_infer(job, payload, ctx)
    assert _result_files(services) == set()
    monkeypatch.undo()
    run_infer(job, payload, ctx)  # the retry stores them
    assert len(_result_files(services)) == 2
