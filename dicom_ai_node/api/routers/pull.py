"""PACS sources: list them, query one for studies, and queue a pull of a study (processed as if received).

Query answers carry no patient name, ID or birth date: the page shows UIDs, date, description, accession
number, modalities and counts. An operator may filter by patient ID; its value is never logged or
audited (the audit records which filters were used, not their values).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from dicom_ai_node.api.deps import CtxDep, Operator, Viewer, record
from dicom_ai_node.api.schemas import JobPublic, Uid
from dicom_ai_node.domain.catalog import StudyQuery
from dicom_ai_node.domain.jobs import PullRequest
from dicom_ai_node.errors import NodeError

router = APIRouter(tags=["pull"])

_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
SourceName = Annotated[str, Path(pattern=_NAME)]
# Query text the PACS matches (wildcards * and ? allowed); no backslash (the DICOM value separator), no NUL.
QueryText = Annotated[str, StringConstraints(max_length=64, pattern=r"^[^\\\x00]*$")]


class SourcePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    type: str
    address: str
    retrieve: str


class FindBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: QueryText | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{0,16}$")] | None = None
    accession_number: QueryText | None = None
    study_description: QueryText | None = None
    limit: int = Field(100, ge=1, le=500)


class StudyMatchPublic(BaseModel):
    """A study at the source, without patient data."""

    model_config = ConfigDict(from_attributes=True)

    study_instance_uid: str
    study_date: str
    study_description: str
    accession_number: str
    modalities: list[str]
    number_of_series: int | None
    number_of_instances: int | None


class PullBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, StringConstraints(pattern=_NAME)]
    study_instance_uid: Uid
    series_instance_uid: Uid | None = None


def _known(ctx: CtxDep, name: str) -> None:
    if name not in {s.name for s in ctx.sources}:
        raise HTTPException(404, f"no source {name!r}")


@router.get("/api/sources")
def list_sources(ctx: CtxDep, _: Viewer) -> list[SourcePublic]:
    return [SourcePublic.model_validate(s) for s in ctx.sources]


@router.post("/api/sources/{name}/find", responses={404: {}, 422: {}, 502: {}})
def find_studies(
    name: SourceName, body: FindBody, request: Request, ctx: CtxDep, principal: Operator
) -> list[StudyMatchPublic]:
    """C-FIND / QIDO-RS at study level; answers without patient data. 502 when the source fails."""
    _known(ctx, name)
    if ctx.find_studies is None:
        raise HTTPException(503, "querying sources is not available in this process")
    if body.date_from and body.date_to and body.date_from > body.date_to:
        raise HTTPException(
            422, [{"loc": ["body", "date_to"], "msg": "before date_from", "type": "value_error"}]
        )
    query = StudyQuery(
        patient_id=body.patient_id or None,
        date_from=body.date_from,
        date_to=body.date_to,
        modality=body.modality or None,
        accession_number=body.accession_number or None,
        study_description=body.study_description or None,
        limit=body.limit,
    )
    detail: dict[str, object] = {"filters": query.filter_keys()}
    try:
        matches = ctx.find_studies(name, query)
    except NodeError as exc:
        # The node's own messages name the source and its address, never a patient.
        record(
            ctx,
            request,
            actor=principal.username,
            action="pull.find",
            target=name,
            outcome="failed",
            detail={**detail, "error": str(exc)},
        )
        raise HTTPException(502, str(exc)) from exc
    record(
        ctx,
        request,
        actor=principal.username,
        action="pull.find",
        target=name,
        detail={**detail, "matches": len(matches)},
    )
    return [StudyMatchPublic.model_validate(m) for m in matches]


@router.post("/api/pull", status_code=202, responses={404: {}})
def pull_study(body: PullBody, request: Request, ctx: CtxDep, principal: Operator) -> JobPublic:
    """Queue a pull of the study (or one series): a worker retrieves it, then it is routed and processed
    like a received study. A pull of the same study still queued or running is returned instead."""
    _known(ctx, body.source)
    pull = PullRequest(body.source, body.study_instance_uid, body.series_instance_uid)
    job_id, new = ctx.queue.enqueue_pull(pull)
    record(
        ctx,
        request,
        actor=principal.username,
        action="pull.request",
        target=f"study/{body.study_instance_uid}",
        detail={"source": body.source, "series": body.series_instance_uid, "job_id": job_id, "new": new},
    )
    job = ctx.queue.get(job_id)
    assert job is not None
    return JobPublic.model_validate(job)
