"""Configured destinations with their recent deliveries, and a connectivity test (C-ECHO / QIDO-RS)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request

from dicom_ai_node.api.deps import CtxDep, Operator, Viewer, record
from dicom_ai_node.api.schemas import DeliveryCounts, DeliveryPublic, DestinationPublic, ProbePublic
from dicom_ai_node.domain.catalog import DestinationInfo, ProbeResult
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.errors import NodeError
from dicom_ai_node.persistence.queue import JobFilter

router = APIRouter(prefix="/api/destinations", tags=["destinations"])

DestinationName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
RECENT = 5


def _public(ctx: CtxDep, dest: DestinationInfo) -> DestinationPublic:
    recent = ctx.queue.list_jobs(limit=RECENT, filter=JobFilter(kind=JobKind.DELIVER, destination=dest.name))

    def count(status: JobStatus) -> int:
        return ctx.queue.count_jobs(JobFilter(kind=JobKind.DELIVER, destination=dest.name, status=status))

    return DestinationPublic(
        name=dest.name,
        type=dest.type,
        address=dest.address,
        options=dest.options,
        recent=[
            DeliveryPublic(
                job_id=j.id,
                status=j.status,
                finished_at=j.finished_at,
                verified=bool((j.result or {}).get("verified")),
                error=(
                    j.last_error
                    if j.status != JobStatus.SUCCEEDED
                    # Stored but not read back (no C-FIND / QIDO-RS at the destination): say why.
                    else (j.result or {}).get("verify_error")
                ),
            )
            for j in recent
        ],
        counts=DeliveryCounts(
            succeeded=count(JobStatus.SUCCEEDED),
            dead=count(JobStatus.DEAD),
            failed=count(JobStatus.FAILED),
            queued=count(JobStatus.QUEUED),
        ),
    )


@router.get("")
def list_destinations(ctx: CtxDep, _: Viewer) -> list[DestinationPublic]:
    return [_public(ctx, d) for d in ctx.destinations]


@router.post("/{name}/test", responses={404: {}})
def test_destination(
    name: DestinationName, request: Request, ctx: CtxDep, principal: Operator
) -> ProbePublic:
    """Can the node reach it now? Answers ok=false with the reason rather than an error status."""
    if name not in {d.name for d in ctx.destinations}:
        raise HTTPException(404, f"no destination {name!r}")
    try:
        result = ctx.probe_destination(name)
    except (NodeError, OSError) as exc:  # the probe should report, not raise; keep the page usable anyway
        result = ProbeResult(ok=False, detail=f"{type(exc).__name__}: {exc}", elapsed_s=0.0)
    record(
        ctx,
        request,
        actor=principal.username,
        action="destination.test",
        target=name,
        outcome="ok" if result.ok else "failed",
        detail={"detail": result.detail, "elapsed_s": round(result.elapsed_s, 3)},
    )
    return ProbePublic.model_validate(result)
