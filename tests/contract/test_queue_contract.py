"""Job queue contract: identical behaviour on SQLite and PostgreSQL (see conftest.engine)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa

from dicom_ai_node.domain.jobs import JobKind, JobStatus, RetryPolicy
from dicom_ai_node.persistence import JobQueue, LeaseLostError
from dicom_ai_node.persistence.tables import jobs
from tests.contract.conftest import FakeClock
from tests.support.payloads import deliver_payload, infer_payload, payload_for

INFER, DELIVER = JobKind.INFER, JobKind.DELIVER
POLICY = RetryPolicy(base_s=10.0, cap_s=100.0, max_attempts=3)
LEASE_S = 30.0


@pytest.fixture
def queue(engine: sa.Engine, clock: FakeClock) -> JobQueue:
    return JobQueue(engine, POLICY, clock=clock)


def test_enqueue_stores_the_job_as_given(queue: JobQueue, clock: FakeClock) -> None:
    payload = infer_payload(series_instance_uid="1.2.3", generation=2)
    job_id = queue.enqueue(INFER, payload, priority=5, lock_key="study-1")
    job = queue.get(job_id)
    assert job is not None
    assert job.kind is INFER and job.status is JobStatus.QUEUED
    assert job.payload == payload.model_dump(exclude_none=True) and job.payload["version"] == 1
    assert (job.priority, job.lock_key, job.dedupe_key) == (5, "study-1", None)
    assert (job.attempts, job.max_attempts) == (0, POLICY.max_attempts)
    # Timestamps come back timezone-aware and identical to the microsecond.
    assert job.created_at == job.scheduled_at == clock.now
    assert job.created_at.utcoffset() == timedelta(0)
    assert job.result is None and job.worker_id is None
    assert queue.get(job_id + 1000) is None


def test_dedupe_key_returns_the_existing_job(queue: JobQueue) -> None:
    first = queue.enqueue(INFER, infer_payload(model="a1"), dedupe_key="series-1.2.3-gen1")
    again = queue.enqueue(INFER, infer_payload(model="a2"), dedupe_key="series-1.2.3-gen1")
    other = queue.enqueue(INFER, infer_payload(model="a3"), dedupe_key="series-1.2.3-gen2")
    plain_1 = queue.enqueue(INFER, infer_payload(model="a4"))
    plain_2 = queue.enqueue(INFER, infer_payload(model="a4"))
    assert again == first
    assert len({first, other, plain_1, plain_2}) == 4
    job = queue.get(first)
    assert job is not None and job.payload["model"] == "a1"
    assert len(queue.list_jobs()) == 4


def test_dedupe_is_race_safe(queue: JobQueue) -> None:
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda i: queue.enqueue(INFER, infer_payload(generation=i + 1), dedupe_key="same"), range(32)
            )
        )
    assert len(set(ids)) == 1
    assert len(queue.list_jobs()) == 1


def test_claim_takes_highest_priority_then_oldest_schedule(queue: JobQueue, clock: FakeClock) -> None:
    low_old = queue.enqueue(INFER, infer_payload(), priority=0)
    clock.advance(1)
    high_new = queue.enqueue(INFER, infer_payload(), priority=10)
    clock.advance(1)
    low_new = queue.enqueue(INFER, infer_payload(), priority=0)
    delayed_top = queue.enqueue(INFER, infer_payload(), priority=99, delay_s=60)

    claimed = [queue.claim("w", [INFER], LEASE_S) for _ in range(4)]
    assert [j.id if j else None for j in claimed] == [high_new, low_old, low_new, None]

    clock.advance(60)
    job = queue.claim("w", [INFER], LEASE_S)
    assert job is not None and job.id == delayed_top


def test_claim_sets_running_fields_and_filters_kind(queue: JobQueue, clock: FakeClock) -> None:
    deliver_id = queue.enqueue(DELIVER, deliver_payload())
    assert queue.claim("w1", [INFER], LEASE_S) is None
    assert queue.claim("w1", [], LEASE_S) is None
    job = queue.claim("w1", [INFER, DELIVER], LEASE_S)
    assert job is not None and job.id == deliver_id
    assert job.status is JobStatus.RUNNING and job.attempts == 1 and job.worker_id == "w1"
    assert job.started_at == job.heartbeat_at == clock.now
    assert queue.claim("w2", [DELIVER], LEASE_S) is None  # running jobs are not claimable


def test_lock_key_excludes_a_second_running_job(queue: JobQueue) -> None:
    a1 = queue.enqueue(INFER, infer_payload(), lock_key="study-A", priority=5)
    a2 = queue.enqueue(INFER, infer_payload(), lock_key="study-A", priority=5)
    b1 = queue.enqueue(INFER, infer_payload(), lock_key="study-B")
    free = queue.enqueue(INFER, infer_payload())

    first = queue.claim("w1", [INFER], LEASE_S)
    assert first is not None and first.id == a1
    # a2 outranks b1 and free, but its study is busy.
    got = [queue.claim(f"w{i}", [INFER], LEASE_S) for i in (2, 3, 4)]
    assert [j.id if j else None for j in got] == [b1, free, None]

    queue.succeed(a1, "w1")
    job = queue.claim("w5", [INFER], LEASE_S)
    assert job is not None and job.id == a2


def test_no_double_claim_under_concurrency(queue: JobQueue) -> None:
    n_workers, n_jobs = 8, 50 * 8
    kinds = [INFER if i % 2 else DELIVER for i in range(n_jobs)]
    job_ids = {queue.enqueue(kind, payload_for(kind)) for kind in kinds}
    claimed: list[int] = []
    guard = threading.Lock()

    def work(worker: int) -> None:
        worker_id = f"worker-{worker}"
        while (job := queue.claim(worker_id, [INFER, DELIVER], LEASE_S)) is not None:
            with guard:
                claimed.append(job.id)
            queue.succeed(job.id, worker_id, {"by": worker_id})

    with ThreadPoolExecutor(n_workers) as pool:
        list(pool.map(work, range(n_workers)))

    duplicates = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert duplicates == []
    assert set(claimed) == job_ids
    done = queue.list_jobs(status=JobStatus.SUCCEEDED, limit=n_jobs + 1)
    assert len(done) == n_jobs and all(j.attempts == 1 for j in done)


def test_lock_key_exclusion_holds_under_concurrency(queue: JobQueue, engine: sa.Engine) -> None:
    keys = ["study-1", "study-2", "study-3"]
    for i in range(48):
        queue.enqueue(INFER, infer_payload(generation=i + 1), lock_key=keys[i % 3])
    running_per_key: list[int] = []
    guard = threading.Lock()
    count_running = (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.lock_key == sa.bindparam("key"), jobs.c.status == "running")
    )

    def work(worker: int) -> None:
        worker_id = f"worker-{worker}"
        while (job := queue.claim(worker_id, [INFER], LEASE_S)) is not None:
            with engine.connect() as conn:  # while we hold it, nobody else runs this study
                n = conn.execute(count_running, {"key": job.lock_key}).scalar_one()
            with guard:
                running_per_key.append(n)
            queue.succeed(job.id, worker_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert running_per_key == [1] * 48
    assert queue.counts()["infer/succeeded"] == 48


def test_database_refuses_two_running_jobs_with_one_lock_key(queue: JobQueue, engine: sa.Engine) -> None:
    a = queue.enqueue(INFER, infer_payload(), lock_key="study-A")
    b = queue.enqueue(INFER, infer_payload(), lock_key="study-A")
    assert queue.claim("w1", [INFER], LEASE_S) is not None
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id == b).values(status="running"))
    job = queue.get(b)
    assert job is not None and job.status is JobStatus.QUEUED
    queue.succeed(a, "w1")
    assert queue.claim("w2", [INFER], LEASE_S) is not None


def test_heartbeat_and_lease_lost(queue: JobQueue, clock: FakeClock) -> None:
    job_id = queue.enqueue(INFER, infer_payload())
    assert queue.claim("w1", [INFER], LEASE_S) is not None
    clock.advance(10)
    assert queue.heartbeat(job_id, "w1") is True
    assert queue.heartbeat(job_id, "w2") is False
    job = queue.get(job_id)
    assert job is not None and job.heartbeat_at == clock.now

    clock.advance(LEASE_S - 1)
    assert queue.recover_stalled(LEASE_S) == 0  # heartbeat renewed the lease
    clock.advance(2)
    assert queue.recover_stalled(LEASE_S) == 1
    assert queue.heartbeat(job_id, "w1") is False
    with pytest.raises(LeaseLostError):
        queue.succeed(job_id, "w1")
    with pytest.raises(LeaseLostError):
        queue.fail(job_id, "w1", "late", permanent=False)
    job = queue.get(job_id)
    assert job is not None and job.status is JobStatus.FAILED


def test_backoff_then_dead_letter_after_max_attempts(queue: JobQueue, clock: FakeClock) -> None:
    job_id = queue.enqueue(DELIVER, deliver_payload())
    for attempt in (1, 2):
        job = queue.claim("w", [DELIVER], LEASE_S)
        assert job is not None and job.id == job_id and job.attempts == attempt
        assert queue.fail(job_id, "w", f"peer down #{attempt}", permanent=False) is JobStatus.FAILED
        job = queue.get(job_id)
        assert job is not None and job.status is JobStatus.FAILED
        assert job.last_error == f"peer down #{attempt}"
        ceiling = POLICY.base_s * 2 ** (attempt - 1)
        delay = (job.scheduled_at - clock.now).total_seconds()
        assert ceiling / 2 <= delay <= ceiling
        clock.advance(delay - 0.5)
        assert queue.claim("w", [DELIVER], LEASE_S) is None  # not before its backoff
        clock.advance(0.5)

    job = queue.claim("w", [DELIVER], LEASE_S)
    assert job is not None and job.attempts == 3
    assert queue.fail(job_id, "w", "peer down #3", permanent=False) is JobStatus.DEAD
    job = queue.get(job_id)
    assert job is not None and job.status is JobStatus.DEAD and job.finished_at == clock.now
    clock.advance(10_000)
    assert queue.claim("w", [DELIVER], LEASE_S) is None
    assert [j.id for j in queue.list_jobs(status=JobStatus.DEAD, kind=DELIVER)] == [job_id]


def test_permanent_failure_goes_straight_to_dead(queue: JobQueue) -> None:
    job_id = queue.enqueue(DELIVER, deliver_payload(), max_attempts=10)
    assert queue.claim("w", [DELIVER], LEASE_S) is not None
    long_error = "association rejected " + "x" * 10_000
    assert queue.fail(job_id, "w", long_error, permanent=True) is JobStatus.DEAD
    job = queue.get(job_id)
    assert job is not None and job.status is JobStatus.DEAD and job.attempts == 1
    assert job.last_error is not None
    assert job.last_error.startswith("association rejected") and len(job.last_error) <= 2000


def test_recover_stalled_requeues_or_buries(queue: JobQueue, clock: FakeClock) -> None:
    retryable = queue.enqueue(INFER, infer_payload(), max_attempts=3)
    exhausted = queue.enqueue(INFER, infer_payload(), max_attempts=1)
    healthy = queue.enqueue(INFER, infer_payload())
    assert queue.claim("gpu-0", [INFER], LEASE_S) is not None
    assert queue.claim("gpu-1", [INFER], LEASE_S) is not None
    clock.advance(LEASE_S / 2)
    assert queue.claim("gpu-2", [INFER], LEASE_S) is not None
    clock.advance(LEASE_S / 2 + 1)

    with ThreadPoolExecutor(4) as pool:  # several node processes sweeping at once
        recovered = list(pool.map(lambda _: queue.recover_stalled(LEASE_S), range(4)))
    assert sum(recovered) == 2
    assert queue.recover_stalled(LEASE_S) == 0  # idempotent

    job = queue.get(retryable)
    assert job is not None and job.status is JobStatus.FAILED and job.scheduled_at == clock.now
    assert job.last_error == "lease expired (worker gpu-0 stopped heartbeating)"
    dead = queue.get(exhausted)
    assert dead is not None and dead.status is JobStatus.DEAD and dead.finished_at == clock.now
    assert dead.last_error == "lease expired (worker gpu-1 stopped heartbeating)"
    alive = queue.get(healthy)
    assert alive is not None and alive.status is JobStatus.RUNNING

    again = queue.claim("gpu-3", [INFER], LEASE_S)
    assert again is not None and again.id == retryable and again.attempts == 2


def test_retry_replays_a_dead_job(queue: JobQueue, clock: FakeClock) -> None:
    job_id = queue.enqueue(DELIVER, deliver_payload())
    assert queue.retry(job_id) is False  # queued: nothing to replay
    assert queue.claim("w", [DELIVER], LEASE_S) is not None
    assert queue.retry(job_id) is False  # running
    queue.fail(job_id, "w", "rejected", permanent=True)
    clock.advance(5)
    assert queue.retry(job_id) is True
    job = queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempts, job.scheduled_at) == (JobStatus.QUEUED, 0, clock.now)
    assert job.finished_at is None and job.worker_id is None
    again = queue.claim("w2", [DELIVER], LEASE_S)
    assert again is not None and again.id == job_id and again.attempts == 1


def test_succeed_stores_result_and_counts(queue: JobQueue) -> None:
    job_id = queue.enqueue(INFER, infer_payload())
    queue.enqueue(INFER, infer_payload())
    queue.enqueue(DELIVER, deliver_payload())
    assert queue.claim("w", [INFER], LEASE_S) is not None
    queue.succeed(job_id, "w", {"seg_sop_instance_uid": "2.25.1"})
    job = queue.get(job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.result == {"seg_sop_instance_uid": "2.25.1"}
    counts = queue.counts()
    assert counts["infer/succeeded"] == 1 and counts["infer/queued"] == 1
    assert counts["deliver/queued"] == 1 and counts["deliver/dead"] == 0
    assert sum(counts.values()) == 3
    with pytest.raises(LeaseLostError):
        queue.succeed(job_id, "w")  # already finished


def test_claim_racing_an_uncommitted_claim_of_the_same_lock_key(queue: JobQueue, engine: sa.Engine) -> None:
    """Another worker's claim of study-A is in flight (not committed) when we claim: we must not run
    a second study-A job. PostgreSQL: the partial unique index makes our UPDATE wait, then fail, then
    the retry skips the key. SQLite: BEGIN IMMEDIATE makes our claim wait for the other one."""
    a1 = queue.enqueue(INFER, infer_payload(), lock_key="study-A", priority=1)
    a2 = queue.enqueue(INFER, infer_payload(), lock_key="study-A", priority=1)
    with ThreadPoolExecutor(1) as pool, engine.connect() as conn:
        with conn.begin():
            conn.execute(sa.update(jobs).where(jobs.c.id == a1).values(status="running", worker_id="w1"))
            racing = pool.submit(queue.claim, "w2", [INFER], LEASE_S)
            threading.Event().wait(0.3)  # let the racing claim reach the lock it has to wait on
            assert not racing.done()
        assert racing.result(timeout=30) is None
    job = queue.get(a2)
    assert job is not None and job.status is JobStatus.QUEUED


def test_release_gives_a_running_job_back_untouched(queue: JobQueue, clock: FakeClock) -> None:
    """A worker shutting down returns its job: queued, runnable now, the attempt not counted."""
    job_id = queue.enqueue(INFER, infer_payload())
    claimed = queue.claim("w1", [INFER], LEASE_S)
    assert claimed is not None and claimed.attempts == 1
    assert queue.release(job_id, "w2") is False  # not the owner
    clock.advance(5)
    assert queue.release(job_id, "w1") is True
    job = queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempts, job.worker_id, job.scheduled_at) == (
        JobStatus.QUEUED,
        0,
        None,
        clock.now,
    )
    assert queue.release(job_id, "w1") is False  # released once; the worker holds nothing any more
    again = queue.claim("w2", [INFER], LEASE_S)
    assert again is not None and again.id == job_id and again.attempts == 1
