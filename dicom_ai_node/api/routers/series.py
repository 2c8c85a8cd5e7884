"""Received series (no PHI: UIDs, modality, description, counts) with their results and jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from dicom_ai_node.api.deps import CtxDep, Viewer
from dicom_ai_node.api.params import Limit, NameQuery, Offset
from dicom_ai_node.api.schemas import JobPublic, ResultPublic, SeriesDetail, SeriesPage, SeriesPublic
from dicom_ai_node.persistence.queue import JobFilter
from dicom_ai_node.persistence.repository import SeriesStatus

router = APIRouter(prefix="/api/series", tags=["series"])

SeriesUid = Annotated[str, Path(pattern=r"^[0-9.]{1,64}$")]


@router.get("")
def list_series(
    ctx: CtxDep,
    _: Viewer,
    status: SeriesStatus | None = None,
    modality: NameQuery = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> SeriesPage:
    """Most recently received first."""
    rows = ctx.repo.list_series(limit=limit, status=status, modality=modality, offset=offset)
    return SeriesPage(
        items=[SeriesPublic.model_validate(r) for r in rows],
        total=ctx.repo.count_series(status, modality=modality),
    )


@router.get("/{series_instance_uid}")
def get_series(series_instance_uid: SeriesUid, ctx: CtxDep, _: Viewer) -> SeriesDetail:
    row = ctx.repo.get_series(series_instance_uid)
    if row is None:
        raise HTTPException(404, "no such series")
    jobs = ctx.queue.list_jobs(limit=500, filter=JobFilter(series_instance_uid=series_instance_uid))
    return SeriesDetail(
        **SeriesPublic.model_validate(row).model_dump(),
        results=[ResultPublic.model_validate(r) for r in ctx.repo.results_of_series(series_instance_uid)],
        jobs=[JobPublic.model_validate(j) for j in jobs],
    )
