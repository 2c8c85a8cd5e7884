"""`pull` jobs on both engines: one unfinished pull per (source, study, series), a finished one does not
block the next pull, progress is written only by the job's owner, and duplicates leave a routed series
alone (a study pulled twice is not processed twice)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import sqlalchemy as sa

from dicom_ai_node.domain.jobs import JobKind, JobStatus, PullRequest, RetryPolicy
from dicom_ai_node.persistence import JobQueue, SeriesRepository
from dicom_ai_node.persistence.repository import SeriesStatus
from tests.contract.conftest import FakeClock

STUDY, SERIES = "1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.1.1"


@pytest.fixture
def queue(engine: sa.Engine, clock: FakeClock) -> JobQueue:
    return JobQueue(engine, RetryPolicy(base_s=1, cap_s=5, max_attempts=3), clock=clock)


def test_a_pull_still_queued_or_running_is_returned_instead_of_a_second(queue: JobQueue) -> None:
    pull = PullRequest("pacs", STUDY)
    first, new = queue.enqueue_pull(pull)
    assert new
    assert queue.enqueue_pull(pull) == (first, False)
    job = queue.claim("w1", [JobKind.PULL], lease_s=60)
    assert job is not None and job.id == first
    assert job.payload == {"version": 1, "source": "pacs", "study_instance_uid": STUDY}
    assert job.priority == PullRequest.PRIORITY and job.max_attempts == PullRequest.MAX_ATTEMPTS
    assert queue.enqueue_pull(pull) == (first, False)  # running
    # Another series, or another source, is another pull.
    assert queue.enqueue_pull(PullRequest("pacs", STUDY, SERIES))[1]
    assert queue.enqueue_pull(PullRequest("other", STUDY))[1]


def test_a_finished_pull_does_not_block_the_next_one(queue: JobQueue) -> None:
    pull = PullRequest("pacs", STUDY)
    first, _ = queue.enqueue_pull(pull)
    job = queue.claim("w1", [JobKind.PULL], lease_s=60)
    assert job is not None
    queue.fail(job.id, "w1", "PACS down", permanent=False)  # failed, waiting for its retry: still unfinished
    assert queue.enqueue_pull(pull) == (first, False)
    assert queue.cancel(first)
    second, new = queue.enqueue_pull(pull)
    assert new and second != first
    third_job = queue.claim("w2", [JobKind.PULL], lease_s=60)
    assert third_job is not None and third_job.id == second
    queue.succeed(second, "w2", {"retrieved": 3})
    third, new = queue.enqueue_pull(pull)
    assert new and third not in (first, second)
    keys = [queue.get(i).dedupe_key for i in (first, second, third)]  # type: ignore[union-attr]
    assert keys == [f"pull:pacs:{STUDY}:*#{n}" for n in (1, 2, 3)]


def test_dedupe_key_prefix_is_not_a_like_pattern(queue: JobQueue) -> None:
    # '_' is a LIKE wildcard: source "a_b" must not see the pulls of source "axb".
    queue.enqueue_pull(PullRequest("axb", STUDY))
    assert queue.enqueue_pull(PullRequest("a_b", STUDY))[1]


def test_progress_is_written_only_by_the_owner_and_replaced_by_the_result(queue: JobQueue) -> None:
    job_id, _ = queue.enqueue_pull(PullRequest("pacs", STUDY))
    assert not queue.set_progress(job_id, "w1", {"retrieved": 1})  # not running yet
    assert queue.claim("w1", [JobKind.PULL], lease_s=60) is not None
    assert not queue.set_progress(job_id, "intruder", {"retrieved": 1})
    assert queue.set_progress(job_id, "w1", {"retrieved": 34, "expected": 48})
    assert queue.get(job_id).result == {"progress": {"retrieved": 34, "expected": 48}}  # type: ignore[union-attr]
    queue.succeed(job_id, "w1", {"retrieved": 48})
    job = queue.get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and job.result == {"retrieved": 48}


def test_duplicates_of_a_routed_series_do_not_reopen_it(engine: sa.Engine, clock: FakeClock) -> None:
    from tests.contract.test_repository_contract import instance  # the suite's InstanceRecord builder

    repo = SeriesRepository(engine, clock=clock)
    records = [instance(i, SERIES) for i in range(1, 4)]
    assert all(repo.record_instance(r) for r in records)
    row = repo.get_series(SERIES)
    assert row is not None
    assert repo.claim_series_for_routing(SERIES, row.generation, row.last_received_at)
    assert repo.mark_series(SERIES, SeriesStatus.ROUTED, generation=row.generation)
    clock.advance(60)
    # The same instances again (a second pull), stored under new spool paths: all refused as duplicates.
    assert not any(
        repo.record_instance(replace(r, spool_path=f"instances/x/{i}.dcm")) for i, r in enumerate(records)
    )
    after = repo.get_series(SERIES)
    assert after is not None
    assert (after.status, after.generation, after.instance_count) == (SeriesStatus.ROUTED, row.generation, 3)
    assert after.last_received_at == row.last_received_at
