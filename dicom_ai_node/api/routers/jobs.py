"""Jobs: filtered lists, one job with its results and timeline, and operator actions (audited)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from dicom_ai_node.api.deps import CtxDep, Operator, Viewer, record
from dicom_ai_node.api.params import IdPath, Limit, NameQuery, Offset, TimeQuery, UidQuery, utc
from dicom_ai_node.api.schemas import (
    DeadLetterReplay,
    DeadLetterReplayed,
    JobDetail,
    JobPage,
    JobPublic,
    ResultPublic,
    TimelineStepPublic,
)
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import PayloadError
from dicom_ai_node.domain.timeline import build_timeline
from dicom_ai_node.persistence.queue import Job, JobFilter

router = APIRouter(tags=["jobs"])


@router.get("/api/jobs")
def list_jobs(
    ctx: CtxDep,
    _: Viewer,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    modality: NameQuery = None,
    rule_id: NameQuery = None,
    model: NameQuery = None,
    destination: NameQuery = None,
    series_instance_uid: UidQuery = None,
    since: TimeQuery = None,
    until: TimeQuery = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JobPage:
    """Newest first; `total` counts every job the filter matches (for paging)."""
    job_filter = JobFilter(
        status=status,
        kind=kind,
        modality=modality,
        rule_id=rule_id,
        model=model,
        destination=destination,
        series_instance_uid=series_instance_uid,
        since=utc(since, "since"),
        until=utc(until, "until"),
    )
    items = ctx.queue.list_jobs(limit=limit, filter=job_filter, offset=offset)
    return JobPage(items=[JobPublic.model_validate(j) for j in items], total=ctx.queue.count_jobs(job_filter))


def _get(ctx: CtxDep, job_id: int) -> Job:
    job = ctx.queue.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def _parent_id(job: Job) -> int | None:
    value = job.payload.get("infer_job_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@router.get("/api/jobs/{job_id}")
def get_job(job_id: IdPath, ctx: CtxDep, _: Viewer) -> JobDetail:
    job = _get(ctx, job_id)
    if job.kind == JobKind.INFER:
        infer: Job | None = job
        deliveries = ctx.queue.children(job.id)
        related = deliveries
    else:
        parent_id = _parent_id(job)
        infer = ctx.queue.get(parent_id) if parent_id is not None else None
        deliveries = ctx.queue.children(infer.id) if infer is not None else [job]
        related = [infer] if infer is not None else []
    uid = job.series_instance_uid or job.payload.get("series_instance_uid")
    series = ctx.repo.get_series(uid) if isinstance(uid, str) else None
    # A pull job has no stage timeline of its own: its progress is in `result` (the page shows it).
    steps = [] if job.kind == JobKind.PULL else build_timeline(infer, series, deliveries)
    return JobDetail(
        **JobPublic.model_validate(job).model_dump(),
        results=[ResultPublic.model_validate(r) for r in ctx.repo.results_of_job(job.id)],
        timeline=[TimelineStepPublic.model_validate(s) for s in steps],
        related=[JobPublic.model_validate(j) for j in related],
    )


def _act(
    ctx: CtxDep,
    request: Request,
    actor: str,
    job: Job,
    action: str,
    acted_on: int | None,
    refused: str,
) -> JobPublic:
    """The shared shape of an operator action: 409 when the queue refused it, else audit and answer.

    `acted_on` is the id of the job the action leaves behind (the job itself, or the new job of a
    re-run), None when the queue refused the action for the job's current status.
    """
    if acted_on is None:
        raise HTTPException(409, f"job {job.id} is {job.status.value}: {refused}")
    detail: dict[str, object] = {"was": job.status.value, "kind": job.kind.value}
    if acted_on != job.id:
        detail["new_job_id"] = acted_on
    record(ctx, request, actor=actor, action=action, target=f"job/{job.id}", detail=detail)
    return JobPublic.model_validate(_get(ctx, acted_on))


@router.post("/api/jobs/{job_id}/retry", responses={404: {}, 409: {}})
def retry_job(job_id: IdPath, request: Request, ctx: CtxDep, principal: Operator) -> JobPublic:
    """A dead or failed job runs again now, with its attempts reset."""
    job = _get(ctx, job_id)
    acted_on = job_id if ctx.queue.retry(job_id) else None
    refused = "only dead or failed jobs can be retried"
    return _act(ctx, request, principal.username, job, "job.retry", acted_on, refused)


@router.post("/api/jobs/{job_id}/rerun", responses={404: {}, 409: {}})
def rerun_job(job_id: IdPath, request: Request, ctx: CtxDep, principal: Operator) -> JobPublic:
    """A finished job runs again as a new job (deterministic UIDs replace its results, not add to them)."""
    job = _get(ctx, job_id)
    try:
        new_id = ctx.queue.rerun(job_id)
    except PayloadError as exc:
        raise HTTPException(409, str(exc)) from None
    refused = "only finished jobs can be re-run"
    return _act(ctx, request, principal.username, job, "job.rerun", new_id, refused)


@router.post("/api/jobs/{job_id}/cancel", responses={404: {}, 409: {}})
def cancel_job(job_id: IdPath, request: Request, ctx: CtxDep, principal: Operator) -> JobPublic:
    """A queued job, or a failed one waiting for its retry, will not run."""
    job = _get(ctx, job_id)
    acted_on = job_id if ctx.queue.cancel(job_id) else None
    refused = "only queued or failed jobs can be cancelled"
    return _act(ctx, request, principal.username, job, "job.cancel", acted_on, refused)


@router.post("/api/dead-letter/replay")
def replay_dead_letter(
    body: DeadLetterReplay, request: Request, ctx: CtxDep, principal: Operator
) -> DeadLetterReplayed:
    """Each dead job of the list runs again; unknown jobs and jobs in other states are skipped."""
    replayed: list[int] = []
    skipped: list[int] = []
    for job_id in dict.fromkeys(body.job_ids):
        job = ctx.queue.get(job_id)
        if job is not None and job.status == JobStatus.DEAD and ctx.queue.retry(job_id):
            replayed.append(job_id)
        else:
            skipped.append(job_id)
    record(
        ctx,
        request,
        actor=principal.username,
        action="deadletter.replay",
        target=f"{len(replayed)} jobs",
        detail={"replayed": replayed, "skipped": skipped},
    )
    return DeadLetterReplayed(replayed=replayed, skipped=skipped)
