"""Admin re-run of finished jobs, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa

from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.persistence.queue import JobQueue
from tests.support.payloads import infer_payload


def test_rerun_copies_a_finished_job_and_keeps_the_original(engine: sa.Engine) -> None:
    queue = JobQueue(engine)
    payload = infer_payload(model="m")
    job_id = queue.enqueue(JobKind.INFER, payload, dedupe_key="k", priority=3, lock_key="series:1")
    assert queue.rerun(job_id) is None  # still queued: nothing to re-run
    job = queue.claim("w", [JobKind.INFER], 60)
    assert job is not None
    queue.succeed(job.id, "w", {"ok": True})
    new_id = queue.rerun(job_id)
    assert new_id is not None and new_id != job_id
    new = queue.get(new_id)
    assert new is not None
    assert new.status == JobStatus.QUEUED and new.payload == {**payload.to_json(), "rerun_of": job_id}
    assert (new.priority, new.lock_key, new.dedupe_key) == (3, "series:1", None)
    original = queue.get(job_id)
    assert original is not None and original.status == JobStatus.SUCCEEDED
    assert queue.rerun(12345) is None
