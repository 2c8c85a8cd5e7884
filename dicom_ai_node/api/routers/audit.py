"""The audit trail (admin only): list with filters, and an export as CSV or JSON (itself audited)."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from dicom_ai_node.api.deps import Admin, CtxDep, record
from dicom_ai_node.api.params import NameQuery, TimeQuery, utc
from dicom_ai_node.api.schemas import INT32_MAX, AuditPublic

router = APIRouter(prefix="/api/audit", tags=["audit"])

EXPORT_MAX = 100_000
_FIELDS = ("id", "at", "actor", "source", "action", "target", "outcome", "detail")


@router.get("")
def list_audit(
    ctx: CtxDep,
    _: Admin,
    action: NameQuery = None,
    actor: NameQuery = None,
    since: TimeQuery = None,
    until: TimeQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> list[AuditPublic]:
    """Newest first; `action` matches a prefix ("rule." finds every rule change); page with before_id."""
    events = ctx.audit.list_events(
        limit=limit,
        before_id=before_id,
        action=action,
        actor=actor,
        since=utc(since, "since"),
        until=utc(until, "until"),
    )
    return [AuditPublic.model_validate(e) for e in events]


def _cell(value: str) -> str:
    """Spreadsheet-safe: a cell starting with = + - @ would run as a formula (actors can be typed names)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


@router.get(
    "/export", response_class=Response, responses={200: {"content": {"text/csv": {}, "application/json": {}}}}
)
def export_audit(
    request: Request,
    ctx: CtxDep,
    principal: Admin,
    format: Literal["csv", "json"] = "csv",
    action: NameQuery = None,
    actor: NameQuery = None,
    since: TimeQuery = None,
    until: TimeQuery = None,
) -> Response:
    events = [
        AuditPublic.model_validate(e)
        for e in ctx.audit.list_events(
            limit=EXPORT_MAX, action=action, actor=actor, since=utc(since, "since"), until=utc(until, "until")
        )
    ]
    record(
        ctx,
        request,
        actor=principal.username,
        action="audit.export",
        detail={"format": format, "events": len(events), "action": action, "actor": actor},
    )
    if format == "json":
        body = json.dumps([e.model_dump(mode="json") for e in events], indent=1)
        media_type = "application/json"
    else:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(_FIELDS)
        for e in events:
            writer.writerow(
                [e.id, e.at.isoformat()]
                + [_cell(v) for v in (e.actor, e.source, e.action, e.target, e.outcome)]
                + [_cell(json.dumps(e.detail, sort_keys=True))]
            )
        body, media_type = out.getvalue(), "text/csv"
    filename = f"audit.{format}"
    return Response(
        body, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )
