"""Job queue additions for the admin page (filter, count, cancel, stats, children), on both engines."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from dicom_ai_node.domain.jobs import JobKind, JobStatus, QueueStats, RetryPolicy
from dicom_ai_node.domain.payloads import PayloadError
from dicom_ai_node.persistence import JobQueue, SeriesRepository
from dicom_ai_node.persistence.queue import JobFilter
from tests.contract.conftest import FakeClock
from tests.support.payloads import deliver_payload, infer_payload

INFER, DELIVER = JobKind.INFER, JobKind.DELIVER
POLICY = RetryPolicy(base_s=10.0, cap_s=100.0, max_attempts=3)
CT_UID, MR_UID = "1.2.826.0.1.3680043.10.2.1", "1.2.826.0.1.3680043.10.2.2"


@pytest.fixture
def queue(engine: sa.Engine, clock: FakeClock) -> JobQueue:
    return JobQueue(engine, POLICY, clock=clock)


def _series(engine: sa.Engine, clock: FakeClock, uid: str, modality: str) -> None:
    from dataclasses import replace

    from tests.contract.test_repository_contract import instance  # the suite's InstanceRecord builder

    SeriesRepository(engine, clock=clock).record_instance(replace(instance(1, uid), modality=modality))


def _infer(queue: JobQueue, uid: str, rule_id: str, model: str) -> int:
    return queue.enqueue(INFER, infer_payload(series_instance_uid=uid, rule_id=rule_id, model=model))


def _deliver(queue: JobQueue, uid: str, destination: str, infer_job_id: int) -> int:
    payload = {
        "destination": destination,
        "files": [],
        "series_instance_uid": uid,
        "infer_job_id": infer_job_id,
    }
    return queue.enqueue(DELIVER, payload)


def test_enqueue_copies_the_filter_columns_from_the_payload(queue: JobQueue) -> None:
    infer = queue.get(_infer(queue, CT_UID, "chest-ct", "lung-seg"))
    assert infer is not None
    assert (infer.series_instance_uid, infer.rule_id, infer.model, infer.destination) == (
        CT_UID,
        "chest-ct",
        "lung-seg",
        None,
    )
    deliver = queue.get(_deliver(queue, CT_UID, "pacs", infer.id))
    assert deliver is not None
    assert (deliver.series_instance_uid, deliver.rule_id, deliver.model, deliver.destination) == (
        CT_UID,
        None,
        None,
        "pacs",
    )
    bare = queue.get(queue.enqueue(DELIVER, deliver_payload(model="x" * 100)))
    assert bare is not None and bare.destination == "pacs" and bare.model == "x" * 64
    # Only a payload of the kind's shape gets in (domain/payloads.py); the error names the field.
    with pytest.raises(
        PayloadError, match=r"^deliver payload does not validate: destination: Input should be"
    ):
        queue.enqueue(DELIVER, {"destination": ["not", "a", "name"], "files": []})


def test_list_and_count_with_a_filter(queue: JobQueue, engine: sa.Engine, clock: FakeClock) -> None:
    _series(engine, clock, CT_UID, "CT")
    _series(engine, clock, MR_UID, "MR")
    start = clock.now
    ct = _infer(queue, CT_UID, "chest-ct", "lung-seg")
    clock.advance(60)
    mr = _infer(queue, MR_UID, "brain-mr", "brain-seg")
    clock.advance(60)
    to_pacs = _deliver(queue, CT_UID, "pacs", ct)
    to_archive = _deliver(queue, CT_UID, "archive", ct)
    orphan = queue.enqueue(DELIVER, {"destination": "pacs", "files": []})  # no series: never matches modality

    def ids(f: JobFilter, limit: int = 100, offset: int = 0) -> list[int]:
        found = [j.id for j in queue.list_jobs(filter=f, limit=limit, offset=offset)]
        assert queue.count_jobs(f) == len(queue.list_jobs(filter=f, limit=1000))
        return found

    assert ids(JobFilter()) == [orphan, to_archive, to_pacs, mr, ct]  # newest first
    assert queue.count_jobs() == 5
    assert ids(JobFilter(kind=INFER)) == [mr, ct]
    assert ids(JobFilter(modality="CT")) == [to_archive, to_pacs, ct]
    assert ids(JobFilter(modality="MR", kind=DELIVER)) == []
    assert ids(JobFilter(rule_id="brain-mr")) == [mr]
    assert ids(JobFilter(model="lung-seg")) == [ct]
    assert ids(JobFilter(destination="pacs")) == [orphan, to_pacs]
    assert ids(JobFilter(series_instance_uid=CT_UID)) == [to_archive, to_pacs, ct]
    assert ids(JobFilter(since=start + timedelta(seconds=60))) == [orphan, to_archive, to_pacs, mr]
    assert ids(JobFilter(until=start + timedelta(seconds=60))) == [ct]
    assert ids(JobFilter(since=start, until=start + timedelta(seconds=61))) == [mr, ct]
    assert ids(JobFilter(status=JobStatus.QUEUED, destination="archive")) == [to_archive]
    assert ids(JobFilter(status=JobStatus.DEAD)) == []
    # Paging, and the old positional call sites still work (and narrow a filter further).
    assert ids(JobFilter(), limit=2) == [orphan, to_archive]
    assert ids(JobFilter(), limit=2, offset=2) == [to_pacs, mr]
    assert ids(JobFilter(), limit=2, offset=4) == [ct]
    assert [j.id for j in queue.list_jobs(JobStatus.QUEUED, INFER)] == [mr, ct]
    assert [j.id for j in queue.list_jobs(kind=DELIVER, filter=JobFilter(modality="CT"))] == [
        to_archive,
        to_pacs,
    ]


def test_cancel_only_queued_or_failed_jobs(queue: JobQueue, clock: FakeClock) -> None:
    queued = _infer(queue, CT_UID, "r", "m")
    failed = _deliver(queue, CT_UID, "pacs", queued)
    claimed = queue.claim("w1", [DELIVER], 60)
    assert claimed is not None and claimed.id == failed
    assert queue.fail(failed, "w1", "timeout", permanent=False) is JobStatus.FAILED
    running = _deliver(queue, CT_UID, "archive", queued)
    clock.advance(1000)  # the failed job's retry is due, so the claim may take either deliver job
    assert queue.claim("w2", [DELIVER], 60) is not None
    running_job = next(j for j in queue.list_jobs(status=JobStatus.RUNNING))
    other = failed if running_job.id == running else running

    assert queue.cancel(queued) is True
    assert queue.cancel(other) is True
    assert queue.cancel(running_job.id) is False
    assert queue.cancel(queued) is False  # already cancelled
    assert queue.cancel(9999) is False
    job = queue.get(queued)
    assert job is not None and job.status is JobStatus.CANCELLED and job.finished_at == clock.now
    # A cancelled job is never claimed, counts as cancelled, and may be re-run (it has finished).
    assert queue.claim("w3", [INFER, DELIVER], 60) is None
    assert queue.counts()["infer/cancelled"] == 1 and queue.counts()["deliver/cancelled"] == 1
    rerun = queue.rerun(queued)
    assert rerun is not None and queue.get(rerun).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert queue.retry(queued) is False  # retry is for dead-letter jobs only


def test_stats_per_kind(queue: JobQueue, clock: FakeClock) -> None:
    empty = QueueStats(depth=0, oldest_age_s=0.0)
    # Every job kind is present, with or without jobs.
    assert queue.stats() == {"infer": empty, "deliver": empty, "pull": empty}
    first = _infer(queue, CT_UID, "r", "m")
    clock.advance(30)
    _infer(queue, MR_UID, "r", "m")
    waiting = _deliver(queue, CT_UID, "pacs", first)
    clock.advance(10)
    claimed = queue.claim("w1", [DELIVER], 60)
    assert claimed is not None and claimed.id == waiting
    queue.fail(waiting, "w1", "timeout", permanent=False)  # failed, waiting for its retry: still waiting work
    assert queue.stats() == {
        "infer": QueueStats(depth=2, oldest_age_s=40.0),
        "deliver": QueueStats(depth=1, oldest_age_s=10.0),
        "pull": empty,
    }
    queue.claim("w2", [INFER], 60)  # the oldest infer job is running now: no longer waiting
    queue.cancel(waiting)
    assert queue.stats() == {"infer": QueueStats(depth=1, oldest_age_s=10.0), "deliver": empty, "pull": empty}


def test_children_are_the_deliver_jobs_of_an_infer_job(queue: JobQueue) -> None:
    infer = _infer(queue, CT_UID, "r", "m")
    again = _infer(queue, CT_UID, "r2", "m2")  # same series, another rule
    other_series = _infer(queue, MR_UID, "r", "m")
    mine = [_deliver(queue, CT_UID, "pacs", infer), _deliver(queue, CT_UID, "archive", infer)]
    _deliver(queue, CT_UID, "pacs", again)
    _deliver(queue, MR_UID, "pacs", other_series)
    assert [j.id for j in queue.children(infer)] == mine
    assert all(j.kind is DELIVER for j in queue.children(infer))
    assert len(queue.children(again)) == 1 and len(queue.children(other_series)) == 1
    assert queue.children(mine[0]) == [] and queue.children(9999) == []
