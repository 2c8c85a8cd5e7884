"""The admin HTTP API and web page (DESIGN.md, "Control plane"). Imports domain + persistence only.

`create_app(ctx)` mounts one router per resource; authentication and roles are dependencies (deps.py),
security headers a middleware (security.py). No PHI is served: series are shown by UID, modality,
description and counts; job errors are the node's own messages, which never name patients.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from dicom_ai_node.api.context import AdminContext
from dicom_ai_node.api.deps import Viewer
from dicom_ai_node.api.routers import (
    audit,
    auth,
    destinations,
    jobs,
    models,
    pull,
    rules,
    series,
    stow,
    system,
    tokens,
    users,
)
from dicom_ai_node.api.security import HostAllowListMiddleware, SecurityHeadersMiddleware

ROUTERS = (system, auth, jobs, series, rules, destinations, models, audit, users, tokens, stow, pull)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 as {"detail": [{"loc", "msg", "type"}]}, like the rule field errors; the offending input is not
    echoed (it may be a password)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(ctx: AdminContext) -> FastAPI:
    # /docs and /redoc load scripts from a CDN, which the CSP forbids; the schema itself is served to
    # signed-in users below.
    app = FastAPI(
        title="dicom-ai-node admin",
        version=ctx.version,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.ctx = ctx
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Added first, so it runs inside the headers middleware: its 400 carries the security headers too.
    app.add_middleware(HostAllowListMiddleware, allowed_hosts=ctx.auth.allowed_hosts)
    app.add_middleware(SecurityHeadersMiddleware)
    for module in ROUTERS:
        app.include_router(module.router)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Viewer) -> dict[str, Any]:
        return app.openapi()

    app.mount("/static", StaticFiles(packages=[("dicom_ai_node.api", "static")]), name="static")
    return app
