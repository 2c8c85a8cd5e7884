"""STOW-RS receive (PS3.18 10.5, Store Transaction): POST /dicom-web/studies[/{study}].

Senders authenticate with an API token only (Authorization: Bearer; no page session, so no CSRF), whose
effective role must be sender, operator or admin. The body is streamed: every part goes to its own temp
file in the spool's incoming dir, and only when the whole multipart body is complete and within the limits
is each part stored, through the same ingest path as C-STORE (ctx.ingest: rename into the spool, then one
DB commit). So a truncated, malformed or oversize body stores nothing; a part that is not a usable DICOM
instance fails alone, listed in FailedSOPSequence with its reason.

Answers (PS3.18 10.5.3): 200 every instance stored (duplicates included: held once), 202 some failed,
409 all failed; 400 malformed body, 413 over a size limit, 415 not multipart/related of application/dicom.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_ai_node.api.deps import CtxDep, record
from dicom_ai_node.api.dicomweb import DICOM_JSON, DICOM_XML, store_response, to_xml, wants_xml
from dicom_ai_node.api.multipart import (
    MultipartError,
    MultipartSplitter,
    PartData,
    PartEnd,
    PartStart,
    check_boundary,
    parse_media_type,
)
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.domain.ingest import FAILURE_CANNOT_UNDERSTAND, Ingest, IngestResult, calling_label

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

DICOM = "application/dicom"
_MB = 2**20


@dataclass(frozen=True)
class Sender:
    """Who is storing: the token's user (audit actor) and the token's name (the series' calling AE)."""

    username: str
    token_name: str
    role: Role


def stow_sender(request: Request, ctx: CtxDep) -> Sender:
    """Bearer API token with a role that may store; a session cookie does not count (scripts and devices
    send STOW-RS, not the page)."""
    header = request.headers.get("authorization")
    if header is None:
        raise HTTPException(
            401, "STOW-RS needs an API token: Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
        )
    scheme, _, secret = header.partition(" ")
    found = ctx.accounts.authenticate_token(secret.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise HTTPException(401, "unknown, expired or revoked API token", {"WWW-Authenticate": "Bearer"})
    user, token = found
    role = token.role if token.role.rank <= user.role.rank else user.role
    if not role.may_store:
        record(
            ctx,
            request,
            actor=user.username,
            action="auth.denied",
            target=request.url.path,
            outcome="denied",
            detail={"method": request.method, "role": role.value, "needed": "sender"},
        )
        raise HTTPException(403, "needs role sender, operator or admin")
    return Sender(user.username, token.name, role)


SenderDep = Annotated[Sender, Depends(stow_sender)]


@dataclass
class _Part:
    media_type: str
    path: Path | None = None  # None: not application/dicom, its bytes are dropped
    size: int = 0


@dataclass
class _Upload:
    """The temp files of one request; `discard()` removes whatever was not stored."""

    parts: list[_Part] = field(default_factory=list)
    total: int = 0
    fh: IO[bytes] | None = None  # the part being written

    def discard(self) -> None:
        self.close_part()
        for part in self.parts:
            if part.path is not None:
                part.path.unlink(missing_ok=True)

    def close_part(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# The body is read as a stream, not through a declared schema; the answers are DICOM JSON or XML.
_STORE_RESPONSE: dict[str, Any] = {"content": {DICOM_JSON: {}, DICOM_XML: {}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored", **_STORE_RESPONSE},
    202: {"description": "some instances failed (FailedSOPSequence)", **_STORE_RESPONSE},
    409: {"description": "every instance failed (FailedSOPSequence)", **_STORE_RESPONSE},
    400: {"description": "malformed multipart body; nothing stored"},
    404: {"description": "STOW-RS is off"},
    413: {"description": "over dicomweb.stow_max_request_mb or stow_max_part_mb; nothing stored"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
}


@router.post("/studies", response_class=Response, responses=_RESPONSES)
async def store_instances(request: Request, ctx: CtxDep, sender: SenderDep) -> Response:
    """Store the instances of a multipart/related; type="application/dicom" body (any studies)."""
    return await _stow(request, ctx, sender, None)


@router.post("/studies/{study}", response_class=Response, responses=_RESPONSES)
async def store_study_instances(request: Request, ctx: CtxDep, sender: SenderDep, study: str) -> Response:
    """Store instances of one study: an instance of another study fails with 0xA900."""
    return await _stow(request, ctx, sender, study)


async def _stow(request: Request, ctx: CtxDep, sender: Sender, study: str | None) -> Response:
    if ctx.ingest is None or ctx.incoming_dir is None:
        raise HTTPException(404, "STOW-RS is not enabled on this node (dicomweb.stow_enabled)")
    upload = _Upload()
    try:
        try:
            boundary = _check_request(request, ctx)
            await _receive(request, ctx, ctx.incoming_dir, boundary, upload)
        except HTTPException as exc:
            _audit_rejected(request, ctx, sender, study, exc)
            raise
        ingest, calling = ctx.ingest, calling_label(sender.token_name)
        results = await run_in_threadpool(lambda: [_store(ingest, p, calling, study) for p in upload.parts])
    finally:
        upload.discard()  # stored parts were moved into the spool; this drops the rest
    return _respond(request, ctx, sender, study, results, upload.total)


def _check_request(request: Request, ctx: CtxDep) -> bytes:
    media, params = parse_media_type(request.headers.get("content-type", ""))
    if media != "multipart/related" or params.get("type", "").strip().lower() != DICOM:
        raise HTTPException(415, 'STOW-RS takes Content-Type: multipart/related; type="application/dicom"')
    if not params.get("boundary"):
        raise HTTPException(415, "multipart/related without a boundary parameter")
    try:
        boundary = check_boundary(params["boundary"])
    except MultipartError as exc:
        raise HTTPException(400, str(exc)) from None
    declared = request.headers.get("content-length")
    limit = ctx.stow_limits.max_request_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"request body over the {limit // _MB} MB limit (dicomweb.stow_max_request_mb)"
        )
    return boundary


async def _receive(request: Request, ctx: CtxDep, incoming: Path, boundary: bytes, upload: _Upload) -> None:
    """Stream the body into one temp file per part; raise HTTPException (nothing kept) on any problem."""
    splitter = MultipartSplitter(boundary)
    max_request, max_part = ctx.stow_limits.max_request_bytes, ctx.stow_limits.max_part_bytes
    try:
        async for chunk in request.stream():
            upload.total += len(chunk)
            if upload.total > max_request:
                raise HTTPException(
                    413, f"request body over the {max_request // _MB} MB limit (dicomweb.stow_max_request_mb)"
                )
            for event in splitter.feed(chunk):
                if isinstance(event, PartStart):
                    upload.parts.append(_open_part(event.headers, incoming, upload))
                elif isinstance(event, PartData):
                    part = upload.parts[-1]
                    part.size += len(event.data)
                    if part.size > max_part:
                        raise HTTPException(
                            413,
                            f"part {len(upload.parts)} over the {max_part // _MB} MB limit "
                            "(dicomweb.stow_max_part_mb)",
                        )
                    if upload.fh is not None:
                        upload.fh.write(event.data)
                elif isinstance(event, PartEnd):
                    upload.close_part()
        splitter.close()
    except MultipartError as exc:
        raise HTTPException(400, f"bad multipart body: {exc}") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before the body was complete") from None
    except OSError as exc:
        raise HTTPException(503, f"cannot write to the spool: {exc.strerror or type(exc).__name__}") from None
    finally:
        upload.close_part()
    if not upload.parts:
        raise HTTPException(400, "bad multipart body: no parts")


def _open_part(headers: dict[str, str], incoming: Path, upload: _Upload) -> _Part:
    # RFC 2387: a part without Content-Type has the type of the `type` parameter (application/dicom).
    media, _ = parse_media_type(headers.get("content-type", DICOM))
    part = _Part(media)
    if media == DICOM:
        # Named by uuid, never by anything the sender chose; `clean_incoming` removes leftovers at start.
        part.path = incoming / f"stow-{uuid.uuid4().hex}.part"
        upload.fh = open(part.path, "xb")  # noqa: SIM115 - closed at the part's end or in discard()
    return part


def _store(ingest: Ingest, part: _Part, calling: str, study: str | None) -> IngestResult:
    if part.path is None:
        return IngestResult(
            FAILURE_CANNOT_UNDERSTAND,
            "",
            "",
            f"part is {part.media_type or 'untyped'}, not {DICOM}",
            stored=False,
        )
    return ingest(part.path, calling, study)


def _respond(
    request: Request,
    ctx: CtxDep,
    sender: Sender,
    study: str | None,
    results: list[IngestResult],
    size: int,
) -> Response:
    stored = [r for r in results if r.stored]
    duplicates = sum(1 for r in stored if r.duplicate)
    failed = [r for r in results if not r.stored]
    status = 200 if not failed else 409 if not stored else 202
    studies = {r.study_instance_uid for r in results if r.study_instance_uid}
    record(
        ctx,
        request,
        actor=sender.username,
        action="stow.store",
        target=study or (next(iter(studies)) if len(studies) == 1 else f"{len(studies)} studies"),
        outcome="ok" if status == 200 else "failed",  # 202/409: detail says how many failed
        # The same counts as a received association's "dicom.instances_transferred" event
        # (receive/audit.py); this action keeps its name, the detail its role and path.
        detail={
            "role": "destination",
            "via": "STOW-RS",
            "token": sender.token_name,
            "studies": sorted(studies)[:20],
            "instances": len(results),
            "parts": len(results),
            "stored": len(stored) - duplicates,
            "duplicates": duplicates,
            "failed": len(failed),
            "failure_reasons": sorted({f"0x{r.status:04X}" for r in failed}),
            "statuses": dict(sorted(Counter(f"0x{r.status:04X}" for r in results).items())),
            "bytes": size,
        },
    )
    log.info(
        "STOW-RS from %s (%s): %d stored, %d duplicate, %d failed",
        sender.username,
        calling_label(sender.token_name),
        len(stored) - duplicates,
        duplicates,
        len(failed),
    )
    ds = store_response(results)
    if wants_xml(request.headers.get("accept")):
        return Response(to_xml(ds), status_code=status, media_type=DICOM_XML)
    return Response(json.dumps(ds.to_json_dict()), status_code=status, media_type=DICOM_JSON)


def _audit_rejected(
    request: Request, ctx: CtxDep, sender: Sender, study: str | None, exc: HTTPException
) -> None:
    record(
        ctx,
        request,
        actor=sender.username,
        action="stow.store",
        target=study or "",
        outcome="failed",
        detail={
            "role": "destination",
            "via": "STOW-RS",
            "token": sender.token_name,
            "status": exc.status_code,
            "reason": str(exc.detail),
        },
    )
