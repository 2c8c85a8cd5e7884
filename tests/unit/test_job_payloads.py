"""Typed job payloads (domain/payloads.py): validated when enqueued and when a worker claims the job; a
payload that does not validate goes to the dead letter at once, naming the field; rows written before
payloads had a version keep working."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import (
    PAYLOAD_MODELS,
    DeliverPayload,
    InferPayload,
    JobPayload,
    PayloadError,
    PullPayload,
    parse_payload,
)
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.persistence.tables import jobs
from dicom_ai_node.worker.runner import JobHandler, Worker
from tests.support.payloads import deliver_payload, infer_payload, pull_payload

# Rows as the node wrote them before payloads had a version (route/completion.py, the infer stage,
# PullRequest.payload()), and as databases migrated by the control-plane revision still hold them.
TODAYS_ROWS: dict[JobKind, dict[str, Any]] = {
    JobKind.INFER: {
        "series_instance_uid": "1.2.826.0.1.3680043.10.1.1",
        "study_instance_uid": "1.2.3.study",
        "generation": 1,
        "rule_id": "chest-ct",
        "rule_version": 3,
        "model": "lung-seg",
        "destinations": ["pacs", "archive"],
    },
    JobKind.DELIVER: {
        "destination": "pacs",
        "files": ["results/ab/seg.dcm", "results/ab/sr.dcm"],
        "fallback_files": [],
        "series_instance_uid": "1.2.826.0.1.3680043.10.1.1",
        "infer_job_id": 1,
        "rule_id": "chest-ct",
        "model": "lung-seg",
    },
    JobKind.PULL: {"source": "pacs", "study_instance_uid": "1.2.3.study"},
}


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    create_schema(engine)
    return engine


@pytest.fixture
def queue(engine: sa.Engine) -> JobQueue:
    return JobQueue(engine)


def _insert_raw(engine: sa.Engine, kind: JobKind, payload_text: str, now: datetime | None = None) -> int:
    """A job row written past JobQueue.enqueue's validation: an older node, a hand edit, a bug."""
    now = now or datetime.now(UTC)
    values = {"scheduled_at": now, "created_at": now, "updated_at": now, "attempts": 0, "max_attempts": 8}
    stmt = sa.insert(jobs).values(
        kind=kind.value, status="queued", payload=payload_text, priority=0, **values
    )
    with engine.begin() as conn:
        return int(conn.execute(stmt.returning(jobs.c.id)).scalar_one())


class _Recorder:
    """Every kind's handler: records the typed payloads it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, JobPayload]] = []

    def __call__(self, job: Job, payload: JobPayload) -> dict[str, Any]:
        self.seen.append((job.id, payload))
        return {"ok": True}

    def worker(self, queue: JobQueue) -> Worker:
        handlers: dict[JobKind, JobHandler[Any]] = {
            kind: JobHandler(model, self) for kind, model in PAYLOAD_MODELS.items()
        }
        return Worker(queue, handlers, list(JobKind), lease_s=60, heartbeat_s=30, poll_interval_s=0.1)


@pytest.mark.parametrize(
    "payload",
    [
        infer_payload(generation=2, rerun_of=7),
        deliver_payload(fallback_files=["results/plain.dcm"], infer_job_id=3, model="ct-lung"),
        pull_payload(series_instance_uid="1.2.3.4"),
    ],
    ids=lambda p: p.KIND.value,
)
def test_each_payload_round_trips_through_its_stored_json(payload: JobPayload) -> None:
    stored = json.loads(json.dumps(payload.to_json()))
    assert stored["version"] == 1
    assert parse_payload(payload.KIND, stored) == payload
    assert parse_payload(payload.KIND, payload) is payload


@pytest.mark.parametrize("kind", list(JobKind), ids=lambda k: k.value)
def test_a_row_in_todays_shape_without_a_version_reads_as_version_1(kind: JobKind) -> None:
    parsed = parse_payload(kind, TODAYS_ROWS[kind])
    assert parsed.version == 1 and parsed.to_json() == {"version": 1, **TODAYS_ROWS[kind]}


def test_older_rows_lacking_later_keys_still_read() -> None:
    """Deliveries before the LABELMAP fallback and the admin filter columns; infer jobs are tolerated
    without a generation (the stage read it with a default of 1)."""
    deliver = parse_payload(JobKind.DELIVER, {"destination": "pacs", "files": ["a.dcm"]})
    assert isinstance(deliver, DeliverPayload) and deliver.fallback_files == [] and deliver.model is None
    infer = parse_payload(
        JobKind.INFER, {k: v for k, v in TODAYS_ROWS[JobKind.INFER].items() if k != "generation"}
    )
    assert isinstance(infer, InferPayload) and infer.generation == 1


def test_the_worker_runs_rows_written_without_a_version(engine: sa.Engine, queue: JobQueue) -> None:
    ids = {kind: _insert_raw(engine, kind, json.dumps(TODAYS_ROWS[kind], sort_keys=True)) for kind in JobKind}
    recorder = _Recorder()
    worker = recorder.worker(queue)
    while worker.run_one() is not None:
        pass
    for job_id in ids.values():
        job = queue.get(job_id)
        assert job is not None and job.status == JobStatus.SUCCEEDED, job.last_error if job else None
    got = {job_id: payload for job_id, payload in recorder.seen}
    assert {job_id: type(got[job_id]) for job_id in ids.values()} == {
        ids[JobKind.INFER]: InferPayload,
        ids[JobKind.DELIVER]: DeliverPayload,
        ids[JobKind.PULL]: PullPayload,
    }
    infer = got[ids[JobKind.INFER]]
    assert isinstance(infer, InferPayload) and infer.destinations == ["pacs", "archive"]


def test_a_malformed_payload_is_dead_lettered_at_once_naming_the_field(
    engine: sa.Engine, queue: JobQueue
) -> None:
    renamed = {**TODAYS_ROWS[JobKind.INFER], "ruleversion": 3}
    del renamed["rule_version"]
    job_id = _insert_raw(engine, JobKind.INFER, json.dumps(renamed))
    recorder = _Recorder()

    assert recorder.worker(queue).run_one() is not None

    job = queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempts, job.max_attempts) == (JobStatus.DEAD, 1, 8)
    assert job.last_error == (
        f"PayloadError: payload of infer job {job_id} does not validate: "
        "rule_version: Field required; ruleversion: Extra inputs are not permitted"
    )
    assert recorder.seen == []  # the stage never ran
    assert job.payload == renamed  # kept as stored, for the admin page
    # Re-running it would only fail again: refused, naming the field.
    with pytest.raises(PayloadError, match="rule_version: Field required"):
        queue.rerun(job_id)


def test_a_payload_that_is_not_an_object_is_dead_lettered_too(engine: sa.Engine, queue: JobQueue) -> None:
    job_id = _insert_raw(engine, JobKind.DELIVER, "[1, 2]")
    _Recorder().worker(queue).run_one()
    job = queue.get(job_id)
    assert job is not None and job.status == JobStatus.DEAD and job.attempts == 1
    assert job.last_error is not None and "destination: Field required" in job.last_error


def test_enqueue_refuses_a_payload_that_does_not_validate(queue: JobQueue) -> None:
    missing = {k: v for k, v in TODAYS_ROWS[JobKind.INFER].items() if k != "model"}
    with pytest.raises(PayloadError, match=r"^infer payload does not validate: model: Field required$"):
        queue.enqueue(JobKind.INFER, missing)
    with pytest.raises(PayloadError, match=r"rule_version: Input should be a valid integer"):
        queue.enqueue(JobKind.INFER, {**TODAYS_ROWS[JobKind.INFER], "rule_version": "three"})
    with pytest.raises(PayloadError, match=r"^deliver payload does not validate: files.1: Input should be"):
        queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": ["a.dcm", 7]})
    with pytest.raises(PayloadError, match=r"^pull payload does not validate: version: Input should be 1$"):
        queue.enqueue(JobKind.PULL, {**TODAYS_ROWS[JobKind.PULL], "version": 2})  # from a newer node
    with pytest.raises(PayloadError, match=r"^infer payload is a DeliverPayload, expected InferPayload$"):
        queue.enqueue(JobKind.INFER, deliver_payload())
    assert queue.count_jobs() == 0


def test_validation_errors_never_echo_the_values(queue: JobQueue) -> None:
    """The message is stored as last_error and shown in the admin page: field names only."""
    with pytest.raises(PayloadError) as caught:
        queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": [], "patient_name": "DOE^JANE"})
    assert "patient_name: Extra inputs are not permitted" in str(caught.value)
    assert "DOE" not in str(caught.value)


def test_a_worker_refuses_a_handler_for_another_kinds_payload(queue: JobQueue) -> None:
    handler = JobHandler(DeliverPayload, lambda job, payload: {})
    with pytest.raises(ValueError, match="infer"):
        Worker(
            queue, {JobKind.INFER: handler}, [JobKind.INFER], lease_s=60, heartbeat_s=30, poll_interval_s=1
        )


def test_the_admin_api_refuses_to_rerun_a_job_whose_payload_does_not_validate(tmp_path: Path) -> None:
    from tests.support.admin_api import make_api

    env = make_api(tmp_path)
    job_id = _insert_raw(
        make_engine(f"sqlite:///{tmp_path / 'api.db'}"), JobKind.DELIVER, '{"files": []}', env.clock()
    )
    assert _Recorder().worker(env.ctx.queue).run_one() is not None
    operator = env.client(headers=env.token("operator"))
    job = operator.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "dead" and "destination: Field required" in job["last_error"]
    r = operator.post(f"/api/jobs/{job_id}/rerun")
    assert r.status_code == 409
    assert (
        r.json()["detail"]
        == f"payload of deliver job {job_id} does not validate: destination: Field required"
    )
