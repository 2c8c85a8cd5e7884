"""Process probes for orchestrators (/healthz, /readyz), Prometheus metrics, and the page shell."""

from __future__ import annotations

import ipaddress
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from dicom_ai_node.api.deps import CtxDep, client_ip, current_principal, require_role
from dicom_ai_node.api.schemas import CheckPublic, Health, Readiness
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.metrics import CONTENT_TYPE

router = APIRouter(tags=["system"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    """The admin page shell; its script and styles come from /static (the CSP forbids inline ones)."""
    return resources.files("dicom_ai_node.api").joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/healthz")
def healthz(ctx: CtxDep) -> Health:
    """The process is alive (no dependency checked: that is /readyz)."""
    return Health(status="ok", version=ctx.version)


@router.get("/readyz", responses={503: {"model": Readiness, "description": "a check failed"}})
def readyz(ctx: CtxDep) -> Response:
    """Database reachable, spool writable with space left, inference process up."""
    checks = {name: CheckPublic.model_validate(c) for name, c in ctx.readiness().items()}
    ready = all(c.ok for c in checks.values())
    body = Readiness(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


def _in_allowed_network(host: str, networks: tuple[str, ...] | list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for network in networks:
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(request: Request, ctx: CtxDep) -> Response:
    """Open to scrapers in `metrics_allowed_networks`; anyone else signs in with a reading role (a STOW
    sender token may store, not read)."""
    if not _in_allowed_network(client_ip(request), ctx.auth.metrics_allowed_networks):
        require_role(Role.VIEWER)(request, ctx, current_principal(request, ctx))
    if ctx.metrics is None:
        return Response("# metrics are disabled\n", media_type="text/plain")
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
