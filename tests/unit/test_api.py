"""Admin API against a real SQLite database (FastAPI TestClient)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_ai_node.api.app import create_app
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.rules import load_rules
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository

RULES = load_rules(Path(__file__).parents[2] / "config" / "rules.yaml")


@pytest.fixture
def api(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    repo, queue = SeriesRepository(engine), JobQueue(engine)
    for i in range(30):
        repo.record_instance(
            InstanceRecord(
                sop_instance_uid=f"1.2.3.4.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid="1.2.3.4",
                study_instance_uid="1.2.3",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=f"instances/x/{i}.dcm",
                size_bytes=1,
                calling_ae="ORTHANC",
                modality="CT",
                body_part_examined="CHEST",
                series_description="CHEST CT",
                header={"Modality": "CT"},
            )
        )
    client = TestClient(create_app(repo, queue, lambda: RULES, {"version": "test"}))
    return client, repo, queue


def test_health_and_metrics(api) -> None:  # type: ignore[no-untyped-def]
    client, _, queue = api
    queue.enqueue(JobKind.INFER, {"model": "m"})
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["jobs"]["infer/queued"] == 1
    metrics = client.get("/metrics").text
    assert 'ainode_jobs{kind="infer",status="queued"} 1' in metrics


def test_jobs_list_detail_and_retry(api) -> None:  # type: ignore[no-untyped-def]
    client, _, queue = api
    job_id = queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": []})
    assert client.post(f"/api/jobs/{job_id}/retry").status_code == 409  # queued: nothing to replay
    job = queue.claim("w", [JobKind.DELIVER], 60)
    queue.fail(job.id, "w", "PermanentDeliveryError: association rejected", permanent=True)
    dead = client.get("/api/jobs", params={"status": "dead"}).json()
    assert [j["id"] for j in dead] == [job_id] and "rejected" in dead[0]["last_error"]
    assert client.post(f"/api/jobs/{job_id}/retry").json()["status"] == "queued"
    assert client.get(f"/api/jobs/{job_id}").json()["status"] == "queued"
    assert client.get("/api/jobs/9999").status_code == 404


def test_series_and_dry_run(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    [series] = client.get("/api/series").json()
    assert series["instance_count"] == 30 and series["modality"] == "CT"
    result = client.post("/api/rules/dry-run", json={"series_instance_uid": "1.2.3.4"}).json()
    by_id = {r["rule_id"]: r for r in result}
    assert by_id["ct-chest-lungs"]["matched"] and not by_id["mr-brain-extraction"]["matched"]
    decided = {c["condition"]: c["value"] for c in by_id["ct-chest-lungs"]["conditions"]}
    assert decided["Modality == 'CT'"] == "CT"
    typed = client.post(
        "/api/rules/dry-run", json={"attributes": {"Modality": "MR", "NumberOfInstances": 100}}
    )
    assert {r["rule_id"]: r["matched"] for r in typed.json()}["mr-brain-extraction"] is True
    assert client.post("/api/rules/dry-run", json={}).status_code == 422
    assert client.post("/api/rules/dry-run", json={"series_instance_uid": "9.9"}).status_code == 404


def test_rules_and_admin_page(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    rules = client.get("/api/rules").json()["rules"]
    assert {r["id"] for r in rules} == {"mr-brain-extraction", "ct-chest-lungs"}
    page = client.get("/")
    assert page.status_code == 200 and "dicom-ai-node" in page.text and "/api/jobs" in page.text


def test_no_phi_in_api_output(api) -> None:  # type: ignore[no-untyped-def]
    """Series rows carry no patient attributes at all (they are never stored)."""
    client, _, _ = api
    text = client.get("/api/series").text
    for key in ("PatientName", "PatientID", "PatientBirthDate", "patient"):
        assert key not in text
