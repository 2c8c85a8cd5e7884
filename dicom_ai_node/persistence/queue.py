"""The durable job queue (DESIGN.md, "Queue and persistence").

States: queued -> running -> succeeded | failed (retry scheduled with backoff) | dead (dead letter); an
operator may cancel a queued or failed job (cancelled, finished). A failed job is runnable again once its ``scheduled_at`` has passed. A running job holds a lease that its
worker renews with `heartbeat`; `recover_stalled` returns jobs whose worker stopped heartbeating.

Claiming: PostgreSQL uses ``SELECT ... FOR UPDATE SKIP LOCKED`` so workers never wait on each other's
candidate rows; SQLite serialises claims with ``BEGIN IMMEDIATE``. On both, a partial unique index allows
at most one running job per lock key, so a claim that races another for the same key fails cleanly and is
retried with the next candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from dicom_ai_node.domain.jobs import JobKind, JobStatus, PullRequest, QueueStats, RetryPolicy
from dicom_ai_node.domain.payloads import JobPayload, PullPayload, parse_payload
from dicom_ai_node.errors import NodeError
from dicom_ai_node.persistence._common import Clock, dump_json, insert_for, load_json, utcnow
from dicom_ai_node.persistence.tables import UtcDateTime, jobs, series

log = logging.getLogger(__name__)

ERROR_MAX_CHARS = 2000
DEFAULT_RETRY_POLICY = RetryPolicy()
_RUNNABLE = (JobStatus.QUEUED.value, JobStatus.FAILED.value)
# A claim loses a lock-key race only when another worker claimed a job with the same key at the same
# moment; the next attempt sees that job running and skips the key.
_CLAIM_RACE_RETRIES = 5
# Copied from the payload key of the same name into a column at enqueue, so jobs can be filtered in SQL.
_PAYLOAD_COLUMNS = ("series_instance_uid", "rule_id", "model", "destination")
_PAYLOAD_COLUMN_CHARS = 64


class LeaseLostError(NodeError):
    """The job is no longer running under this worker (lease expired and recovered, or re-claimed)."""

    def __init__(self, job_id: int, worker_id: str) -> None:
        super().__init__(f"job {job_id} is no longer running under worker '{worker_id}'")
        self.job_id = job_id
        self.worker_id = worker_id


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    status: JobStatus
    # As stored (JSON): the worker parses it into the kind's model (domain/payloads.py) when it claims
    # the job; the admin page shows it as is, even when it does not validate.
    payload: dict[str, Any]
    priority: int
    scheduled_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    dedupe_key: str | None
    lock_key: str | None
    worker_id: str | None
    heartbeat_at: datetime | None
    last_error: str | None
    result: dict[str, Any] | None
    series_instance_uid: str | None = None
    rule_id: str | None = None
    model: str | None = None
    destination: str | None = None


@dataclass(frozen=True)
class JobFilter:
    """Which jobs to list or count; every field given must match (None: any)."""

    status: JobStatus | None = None
    kind: JobKind | None = None
    # The job's series' modality (jobs without a series row never match).
    modality: str | None = None
    rule_id: str | None = None
    model: str | None = None
    destination: str | None = None
    series_instance_uid: str | None = None
    # On created_at: since <= created_at < until.
    since: datetime | None = None
    until: datetime | None = None


class JobQueue:
    def __init__(
        self, engine: sa.Engine, policy: RetryPolicy = DEFAULT_RETRY_POLICY, clock: Clock = utcnow
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def policy(self) -> RetryPolicy:
        return self._policy

    def enqueue(
        self,
        kind: JobKind,
        payload: JobPayload | Mapping[str, Any],
        *,
        dedupe_key: str | None = None,
        priority: int = 0,
        lock_key: str | None = None,
        max_attempts: int | None = None,
        delay_s: float = 0,
    ) -> int:
        """Add a job and return its id; with a `dedupe_key` already stored, return that job's id instead.

        The payload is the kind's model (domain/payloads.py), or a mapping validated against it:
        PayloadError, naming the field, when it does not validate. It must hold no PHI (UIDs are fine):
        it is shown in the admin page.
        """
        stored = parse_payload(kind, payload).to_json()
        now = self._clock()
        stmt = insert_for(self._engine, jobs).values(
            kind=JobKind(kind).value,
            status=JobStatus.QUEUED.value,
            payload=dump_json(stored),
            priority=priority,
            scheduled_at=now + timedelta(seconds=delay_s),
            created_at=now,
            updated_at=now,
            attempts=0,
            max_attempts=max_attempts if max_attempts is not None else self._policy.max_attempts,
            dedupe_key=dedupe_key,
            lock_key=lock_key,
            **_payload_columns(stored),
        )
        if dedupe_key is not None:
            # Race-safe: the unique constraint decides; the loser reads the winner's id.
            stmt = stmt.on_conflict_do_nothing(index_elements=[jobs.c.dedupe_key])
        with self._engine.begin() as conn:
            job_id = conn.execute(stmt.returning(jobs.c.id)).scalar_one_or_none()
            if job_id is None:
                job_id = conn.execute(
                    sa.select(jobs.c.id).where(jobs.c.dedupe_key == dedupe_key)
                ).scalar_one()
        return int(job_id)

    def enqueue_while_unfinished(
        self, kind: JobKind, payload: JobPayload | Mapping[str, Any], *, dedupe_key: str, **options: Any
    ) -> tuple[int, bool]:
        """One unfinished job per `dedupe_key`: (id of the queued/running/failed one, False) if there is
        one, else (id of a new job, True). Unlike `enqueue`'s key, this one may run again once finished.

        Dedupe keys are unique for ever in the jobs table, so the stored key is ``{dedupe_key}#{n}`` with
        n = 1 + the finished jobs of this key: concurrent callers compute the same n and the unique
        constraint lets one of them in; after that job finishes, the next call gets n + 1.
        """
        same_key = sa.or_(
            jobs.c.dedupe_key == dedupe_key, jobs.c.dedupe_key.startswith(f"{dedupe_key}#", autoescape=True)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.id, jobs.c.status).where(same_key).order_by(jobs.c.id)).all()
        for job_id, status in rows:
            if status in (*_RUNNABLE, JobStatus.RUNNING.value):
                return int(job_id), False
        job_id = self.enqueue(kind, payload, dedupe_key=f"{dedupe_key}#{len(rows) + 1}", **options)
        return job_id, all(job_id != r.id for r in rows)

    def enqueue_pull(self, request: PullRequest) -> tuple[int, bool]:
        """(job id, whether it is new): a pull of the same study (and series) that is still queued,
        running or waiting for a retry is returned instead of a second one."""
        return self.enqueue_while_unfinished(
            JobKind.PULL,
            PullPayload(
                source=request.source,
                study_instance_uid=request.study_instance_uid,
                series_instance_uid=request.series_instance_uid or None,
            ),
            dedupe_key=request.dedupe_key(),
            priority=request.PRIORITY,
            max_attempts=request.MAX_ATTEMPTS,
        )

    def claim(self, worker_id: str, kinds: Sequence[JobKind], lease_s: float) -> Job | None:
        """Take the next runnable job of `kinds` for `worker_id`, or None when there is none.

        Order: highest priority, then oldest scheduled_at. Jobs whose lock key has a running job are
        skipped. The lease (`lease_s`) is not stored: it is heartbeat_at + the `lease_s` that
        `recover_stalled` is given, so workers and the recovery sweep must use the same value.
        """
        kind_values = [JobKind(k).value for k in kinds]
        if not kind_values:
            return None
        for _ in range(_CLAIM_RACE_RETRIES):
            try:
                return self._claim_once(worker_id, kind_values)
            except sa.exc.IntegrityError:
                log.debug("claim by %s lost a lock-key race; retrying", worker_id)
        return None

    def _claim_once(self, worker_id: str, kind_values: list[str]) -> Job | None:
        now = self._clock()
        running = jobs.alias("running")
        lock_busy = (
            sa.select(running.c.id)
            .where(running.c.lock_key == jobs.c.lock_key, running.c.status == JobStatus.RUNNING.value)
            .exists()
        )
        candidate = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.status.in_(_RUNNABLE),
                jobs.c.kind.in_(kind_values),
                jobs.c.scheduled_at <= now,
                sa.or_(jobs.c.lock_key.is_(None), ~lock_busy),
            )
            .order_by(jobs.c.priority.desc(), jobs.c.scheduled_at, jobs.c.id)
            .limit(1)
        )
        if self._postgres:
            candidate = candidate.with_for_update(skip_locked=True, of=jobs)
        with self._engine.begin() as conn:
            job_id = conn.execute(candidate).scalar_one_or_none()
            if job_id is None:
                return None
            row = (
                conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status.in_(_RUNNABLE))
                    .values(
                        status=JobStatus.RUNNING.value,
                        attempts=jobs.c.attempts + 1,
                        worker_id=worker_id,
                        started_at=now,
                        heartbeat_at=now,
                        finished_at=None,
                        updated_at=now,
                    )
                    .returning(*jobs.c)
                )
                .mappings()
                .one_or_none()
            )
        return _job(row) if row is not None else None

    def heartbeat(self, job_id: int, worker_id: str) -> bool:
        """Renew the lease; False when the job is no longer running under `worker_id` (lease lost)."""
        now = self._clock()
        stmt = sa.update(jobs).where(*_owned(job_id, worker_id)).values(heartbeat_at=now, updated_at=now)
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def set_progress(self, job_id: int, worker_id: str, progress: dict[str, Any]) -> bool:
        """Store a running job's progress (no PHI) in its `result`, which `succeed` later replaces.

        Guarded by ownership like `heartbeat`: False (nothing written) when the job is no longer running
        under `worker_id`.
        """
        now = self._clock()
        stmt = (
            sa.update(jobs)
            .where(*_owned(job_id, worker_id))
            .values(result=dump_json({"progress": progress}), updated_at=now)
        )
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def succeed(self, job_id: int, worker_id: str, result: dict[str, Any] | None = None) -> None:
        """Mark the job succeeded. Raises LeaseLostError if it is no longer running under `worker_id`."""
        now = self._clock()
        stmt = (
            sa.update(jobs)
            .where(*_owned(job_id, worker_id))
            .values(
                status=JobStatus.SUCCEEDED.value,
                finished_at=now,
                updated_at=now,
                result=dump_json(result) if result is not None else None,
            )
        )
        with self._engine.begin() as conn:
            if conn.execute(stmt).rowcount != 1:
                raise LeaseLostError(job_id, worker_id)

    def fail(self, job_id: int, worker_id: str, error: str, *, permanent: bool) -> JobStatus:
        """Record a failed attempt: DEAD if `permanent` or attempts are used up, else FAILED with backoff.

        Raises LeaseLostError if the job is no longer running under `worker_id`.
        """
        now = self._clock()
        with self._engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs.c.attempts, jobs.c.max_attempts).where(*_owned(job_id, worker_id))
            ).one_or_none()
            if row is None:
                raise LeaseLostError(job_id, worker_id)
            attempts, max_attempts = int(row.attempts), int(row.max_attempts)
            values: dict[str, Any] = {"last_error": _truncate(error), "updated_at": now}
            if permanent or attempts >= max_attempts:
                status = JobStatus.DEAD
                values["finished_at"] = now
            else:
                status = JobStatus.FAILED
                values["scheduled_at"] = now + timedelta(seconds=self._policy.delay_s(attempts))
            values["status"] = status.value
            # Guarded again: recover_stalled may have taken the job between the two statements.
            if conn.execute(sa.update(jobs).where(*_owned(job_id, worker_id)).values(values)).rowcount != 1:
                raise LeaseLostError(job_id, worker_id)
        return status

    def release(self, job_id: int, worker_id: str) -> bool:
        """Give a running job back untouched (its worker is shutting down): QUEUED and runnable now, the
        attempt it had taken returned, no worker. False when it no longer runs under `worker_id`."""
        now = self._clock()
        stmt = (
            sa.update(jobs)
            .where(*_owned(job_id, worker_id))
            .values(
                status=JobStatus.QUEUED.value,
                attempts=sa.case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0),
                worker_id=None,
                heartbeat_at=None,
                started_at=None,
                scheduled_at=now,
                updated_at=now,
            )
        )
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def recover_stalled(self, lease_s: float) -> int:
        """Return running jobs whose heartbeat is older than `lease_s` to the queue; returns how many.

        They become FAILED and runnable now, or DEAD when their attempts are used up. One guarded
        statement: idempotent and safe when several processes run it at once.
        """
        now = self._clock()
        exhausted = jobs.c.attempts >= jobs.c.max_attempts
        error = (
            sa.literal("lease expired (worker ", sa.Text)
            + sa.func.coalesce(jobs.c.worker_id, "?")
            + sa.literal(" stopped heartbeating)", sa.Text)
        )
        stmt = (
            sa.update(jobs)
            .where(
                jobs.c.status == JobStatus.RUNNING.value,
                jobs.c.heartbeat_at < now - timedelta(seconds=lease_s),
            )
            .values(
                status=sa.case((exhausted, JobStatus.DEAD.value), else_=JobStatus.FAILED.value),
                finished_at=sa.case((exhausted, sa.literal(now, UtcDateTime())), else_=sa.null()),
                scheduled_at=now,
                updated_at=now,
                last_error=error,
            )
        )
        with self._engine.begin() as conn:
            count = conn.execute(stmt).rowcount
        if count:
            log.warning("recovered %d stalled job(s) (lease %.0f s)", count, lease_s)
        return count

    def retry(self, job_id: int) -> bool:
        """Admin replay: a DEAD or FAILED job goes back to QUEUED now with attempts reset."""
        now = self._clock()
        stmt = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_((JobStatus.DEAD.value, JobStatus.FAILED.value)))
            .values(
                status=JobStatus.QUEUED.value,
                scheduled_at=now,
                updated_at=now,
                attempts=0,
                finished_at=None,
                worker_id=None,
                heartbeat_at=None,
            )
        )
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def rerun(self, job_id: int) -> int | None:
        """Admin re-run of a finished (SUCCEEDED, DEAD or CANCELLED) job: a new job with the same kind and payload.

        The original stays as it was (its history is the audit trail). Results use deterministic UIDs,
        so re-running an infer job replaces its objects in the PACS instead of adding a result series.
        Returns the new job's id, or None when the job does not exist or has not finished. Raises
        PayloadError when the job's payload does not validate (re-running it would only fail again).
        """
        job = self.get(job_id)
        if job is None or job.status not in (JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED):
            return None
        return self.enqueue(
            job.kind,
            parse_payload(job.kind, {**job.payload, "rerun_of": job.id}, job_id=job.id),
            priority=job.priority,
            lock_key=job.lock_key,
            max_attempts=job.max_attempts,
        )

    def get(self, job_id: int) -> Job | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().one_or_none()
        return _job(row) if row is not None else None

    def list_jobs(
        self,
        status: JobStatus | None = None,
        kind: JobKind | None = None,
        limit: int = 100,
        *,
        filter: JobFilter | None = None,
        offset: int = 0,
    ) -> list[Job]:
        """Newest first; `status` and `kind` narrow `filter` further (older call sites pass only those)."""
        stmt = sa.select(jobs).where(*_conditions(filter or JobFilter(status=status, kind=kind)))
        if filter is not None:
            if status is not None:
                stmt = stmt.where(jobs.c.status == JobStatus(status).value)
            if kind is not None:
                stmt = stmt.where(jobs.c.kind == JobKind(kind).value)
        stmt = stmt.order_by(jobs.c.id.desc()).limit(limit).offset(offset)
        with self._engine.connect() as conn:
            return [_job(row) for row in conn.execute(stmt).mappings()]

    def count_jobs(self, filter: JobFilter | None = None) -> int:
        stmt = sa.select(sa.func.count()).select_from(jobs).where(*_conditions(filter or JobFilter()))
        with self._engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def cancel(self, job_id: int) -> bool:
        """Operator cancel: a QUEUED or FAILED job becomes CANCELLED (finished); False for any other state.

        A running job is not interrupted (its worker would not notice); cancel it after it fails, or let
        it finish.
        """
        now = self._clock()
        stmt = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(_RUNNABLE))
            .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now)
        )
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def stats(self) -> dict[str, QueueStats]:
        """Per job kind (every kind present): jobs waiting to run (queued or failed awaiting a retry)
        and the age of the oldest of them by created_at (0 when none), for metrics."""
        now = self._clock()
        stmt = (
            sa.select(jobs.c.kind, sa.func.count(), sa.func.min(jobs.c.created_at))
            .where(jobs.c.status.in_(_RUNNABLE))
            .group_by(jobs.c.kind)
        )
        stats = {k.value: QueueStats(depth=0, oldest_age_s=0.0) for k in JobKind}
        with self._engine.connect() as conn:
            for kind, depth, oldest in conn.execute(stmt):
                # min() over a TypeDecorator column comes back through UtcDateTime on both engines.
                age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
                stats[str(kind)] = QueueStats(depth=int(depth), oldest_age_s=age)
        return stats

    def children(self, infer_job_id: int) -> list[Job]:
        """The deliver jobs an infer job enqueued (oldest first), found by its series and then by the
        payload's infer_job_id (the series column keeps the candidate set small)."""
        parent = self.get(infer_job_id)
        if parent is None or parent.series_instance_uid is None:
            return []
        stmt = (
            sa.select(jobs)
            .where(
                jobs.c.kind == JobKind.DELIVER.value,
                jobs.c.series_instance_uid == parent.series_instance_uid,
                jobs.c.id > infer_job_id,
            )
            .order_by(jobs.c.id)
        )
        with self._engine.connect() as conn:
            found = [_job(row) for row in conn.execute(stmt).mappings()]
        return [j for j in found if j.payload.get("infer_job_id") == infer_job_id]

    def counts(self) -> dict[str, int]:
        """Jobs per 'kind/status' (e.g. 'infer/queued'), every known pair present, for metrics."""
        counts = {f"{k.value}/{s.value}": 0 for k in JobKind for s in JobStatus}
        stmt = sa.select(jobs.c.kind, jobs.c.status, sa.func.count()).group_by(jobs.c.kind, jobs.c.status)
        with self._engine.connect() as conn:
            for kind, status, n in conn.execute(stmt):
                counts[f"{kind}/{status}"] = int(n)
        return counts


def _owned(job_id: int, worker_id: str) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        jobs.c.id == job_id,
        jobs.c.status == JobStatus.RUNNING.value,
        jobs.c.worker_id == worker_id,
    )


def _conditions(f: JobFilter) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if f.status is not None:
        conditions.append(jobs.c.status == JobStatus(f.status).value)
    if f.kind is not None:
        conditions.append(jobs.c.kind == JobKind(f.kind).value)
    for name in _PAYLOAD_COLUMNS:
        value = getattr(f, name)
        if value is not None:
            conditions.append(jobs.c[name] == value)
    if f.modality is not None:
        conditions.append(
            sa.exists().where(
                series.c.series_instance_uid == jobs.c.series_instance_uid, series.c.modality == f.modality
            )
        )
    if f.since is not None:
        conditions.append(jobs.c.created_at >= f.since)
    if f.until is not None:
        conditions.append(jobs.c.created_at < f.until)
    return conditions


def _payload_columns(payload: dict[str, Any]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for name in _PAYLOAD_COLUMNS:
        value = payload.get(name)
        ok = value is not None and not isinstance(value, dict | list)
        values[name] = str(value)[:_PAYLOAD_COLUMN_CHARS] if ok else None
    return values


def _truncate(error: str) -> str:
    if len(error) <= ERROR_MAX_CHARS:
        return error
    return error[: ERROR_MAX_CHARS - 15] + " ...[truncated]"


def _job(row: sa.RowMapping) -> Job:
    values = dict(row)
    values["kind"] = JobKind(values["kind"])
    values["status"] = JobStatus(values["status"])
    values["payload"] = load_json(values["payload"])
    values["result"] = load_json(values["result"]) if values["result"] is not None else None
    return Job(**values)
