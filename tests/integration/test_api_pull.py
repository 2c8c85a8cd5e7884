"""The pull routes of the admin API: sources listed, a query answered without patient data and audited
without filter values, a pull queued once while unfinished, and its progress shown on the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai_node.domain.catalog import SourceInfo, StudyMatchInfo, StudyQuery
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.errors import TransientPullError
from tests.support.admin_api import ApiEnv, make_api

STUDY = "1.2.826.0.1.3680043.10.77.1"


@pytest.fixture
def env(tmp_path: Path) -> ApiEnv:
    env = make_api(tmp_path)
    env.ctx.sources = [SourceInfo("pacs", "dicom", "PACS@10.0.0.1:104", "move")]
    asked: list[tuple[str, StudyQuery]] = []

    def find(name: str, query: StudyQuery) -> list[StudyMatchInfo]:
        asked.append((name, query))
        if query.accession_number == "FAIL":
            raise TransientPullError("cannot associate with pacs (PACS@10.0.0.1:104)")
        return [StudyMatchInfo(STUDY, "20240105", "CHEST", "ACC1", ("CT",), 1, 20)]

    env.ctx.find_studies = find
    env.asked = asked  # type: ignore[attr-defined]
    return env


def test_sources_are_listed_for_viewers(env: ApiEnv) -> None:
    r = env.client().get("/api/sources", headers=env.token("viewer"))
    assert r.status_code == 200
    assert r.json() == [{"name": "pacs", "type": "dicom", "address": "PACS@10.0.0.1:104", "retrieve": "move"}]


def test_find_answers_without_patient_data_and_audits_filter_names_only(env: ApiEnv) -> None:
    body = {"patient_id": "PID-SECRET-42", "date_from": "2024-01-01", "modality": "CT"}
    r = env.client().post("/api/sources/pacs/find", json=body, headers=env.token("operator"))
    assert r.status_code == 200, r.text
    [match] = r.json()
    assert match["study_instance_uid"] == STUDY and match["modalities"] == ["CT"]
    assert not [k for k in match if "patient" in k]
    name, query = env.asked[0]  # type: ignore[attr-defined]
    assert name == "pacs" and query.patient_id == "PID-SECRET-42" and query.modality == "CT"
    [event] = env.ctx.audit.list_events(action="pull.find")
    assert event.detail == {"filters": ["patient_id", "date_from", "modality"], "matches": 1}
    assert "PID-SECRET-42" not in repr(env.ctx.audit.list_events(limit=1000))


def test_find_errors_are_502_and_unknown_sources_404(env: ApiEnv) -> None:
    client, token = env.client(), env.token("operator")
    r = client.post("/api/sources/pacs/find", json={"accession_number": "FAIL"}, headers=token)
    assert r.status_code == 502 and "cannot associate" in r.json()["detail"]
    assert client.post("/api/sources/nope/find", json={}, headers=token).status_code == 404
    bad = client.post(
        "/api/sources/pacs/find", json={"date_from": "2024-02-01", "date_to": "2024-01-01"}, headers=token
    )
    assert bad.status_code == 422


def test_pull_is_queued_once_while_unfinished_and_shows_progress(env: ApiEnv) -> None:
    client, token = env.client(), env.token("operator")
    body = {"source": "pacs", "study_instance_uid": STUDY}
    first = client.post("/api/pull", json=body, headers=token)
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["kind"] == "pull" and job["status"] == "queued"
    assert client.post("/api/pull", json=body, headers=token).json()["id"] == job["id"]
    assert client.post("/api/pull", json={**body, "source": "nope"}, headers=token).status_code == 404

    claimed = env.ctx.queue.claim("w1", [JobKind.PULL], lease_s=60)
    assert claimed is not None and claimed.id == job["id"]
    env.ctx.queue.set_progress(claimed.id, "w1", {"retrieved": 34, "expected": 48, "method": "C-MOVE"})
    detail = client.get(f"/api/jobs/{job['id']}", headers=env.token("viewer")).json()
    assert detail["result"] == {"progress": {"retrieved": 34, "expected": 48, "method": "C-MOVE"}}
    assert detail["payload"] == {"version": 1, "source": "pacs", "study_instance_uid": STUDY}
    assert detail["timeline"] == []
    [event] = env.ctx.audit.list_events(action="pull.request", limit=1)
    assert event.target == f"study/{STUDY}"
