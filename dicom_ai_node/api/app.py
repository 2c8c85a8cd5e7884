"""Admin HTTP API and web page. Imports domain + persistence only (DESIGN.md import direction).

No PHI is served: series are shown by UID, modality, description and counts; job errors are the node's
own messages, which never contain patient names or IDs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.rules import RuleSet, match_rule
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository, SeriesRow
from dicom_ai_node.persistence.series_attrs import series_attributes


def _plain(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if hasattr(obj, "value") and not isinstance(obj, (int, str)):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def job_public(job: Job) -> dict[str, Any]:
    return _plain(asdict(job))  # type: ignore[no-any-return]


def series_public(row: SeriesRow) -> dict[str, Any]:
    return _plain(asdict(row))  # type: ignore[no-any-return]


class DryRunRequest(BaseModel):
    series_instance_uid: str | None = None
    attributes: dict[str, Any] | None = None


def create_app(
    repo: SeriesRepository,
    queue: JobQueue,
    rules: Callable[[], RuleSet],
    info: dict[str, Any],
) -> FastAPI:
    app = FastAPI(title="dicom-ai-node admin", version=str(info.get("version", "")))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return resources.files("dicom_ai_node.api").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            counts = queue.counts()
        except SQLAlchemyError as exc:
            raise HTTPException(503, f"database unavailable: {type(exc).__name__}") from exc
        return {"status": "ok", "jobs": counts, **info}

    @app.get("/api/jobs")
    def list_jobs(
        status: JobStatus | None = None, kind: JobKind | None = None, limit: int = Query(100, le=1000)
    ) -> list[dict[str, Any]]:
        return [job_public(j) for j in queue.list_jobs(status=status, kind=kind, limit=limit)]

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: int) -> dict[str, Any]:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        out = job_public(job)
        out["results"] = [_plain(asdict(r)) for r in repo.results_of_job(job_id)]
        return out

    @app.post("/api/jobs/{job_id}/retry")
    def retry_job(job_id: int) -> dict[str, Any]:
        if not queue.retry(job_id):
            raise HTTPException(409, f"job {job_id} is not dead or failed")
        return {"job_id": job_id, "status": "queued"}

    @app.post("/api/jobs/{job_id}/rerun")
    def rerun_job(job_id: int) -> dict[str, Any]:
        new_id = queue.rerun(job_id)
        if new_id is None:
            raise HTTPException(409, f"job {job_id} has not finished (or does not exist)")
        return {"job_id": new_id, "rerun_of": job_id, "status": "queued"}

    @app.get("/api/series")
    def list_series(status: str | None = None, limit: int = Query(100, le=1000)) -> list[dict[str, Any]]:
        return [series_public(s) for s in repo.list_series(limit=limit, status=status)]

    @app.get("/api/series/{series_instance_uid}")
    def get_series(series_instance_uid: str) -> dict[str, Any]:
        row = repo.get_series(series_instance_uid)
        if row is None:
            raise HTTPException(404, "no such series")
        out = series_public(row)
        out["results"] = [_plain(asdict(r)) for r in repo.results_of_series(series_instance_uid)]
        return out

    @app.get("/api/rules")
    def get_rules() -> dict[str, Any]:
        return rules().model_dump(by_alias=True, exclude_none=True)

    @app.post("/api/rules/dry-run")
    def dry_run(req: DryRunRequest) -> list[dict[str, Any]]:
        """Which rules would route this series (or these header attributes), and which attributes decided."""
        if req.series_instance_uid:
            row = repo.get_series(req.series_instance_uid)
            if row is None:
                raise HTTPException(404, "no such series")
            attrs = series_attributes(row)
        elif req.attributes is not None:
            attrs = req.attributes
        else:
            raise HTTPException(422, "give series_instance_uid or attributes")
        out = []
        for rule in rules().rules:
            result = match_rule(rule, attrs)
            out.append(
                {
                    "rule_id": rule.id,
                    "rule_version": rule.version,
                    "matched": result.matched,
                    "model": rule.action.model,
                    "destinations": rule.action.destinations,
                    "conditions": [_plain(asdict(c)) for c in result.conditions],
                }
            )
        return out

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text format; labels are job kind/status only (no PHI, no UIDs)."""
        lines = ["# HELP ainode_jobs Jobs by kind and status", "# TYPE ainode_jobs gauge"]
        for key, n in sorted(queue.counts().items()):
            kind, status = key.split("/")
            lines.append(f'ainode_jobs{{kind="{kind}",status="{status}"}} {n}')
        return "\n".join(lines) + "\n"

    return app
