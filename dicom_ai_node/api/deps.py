"""Request dependencies: the node context, who is asking (session cookie or API token), and role checks.

`CurrentUser` is any signed-in principal; `Viewer`, `Operator` and `Admin` also demand a role. A request
authenticated by the session cookie with an unsafe method must carry the session's CSRF token in the
`X-CSRF-Token` header: SameSite=Strict already keeps cross-site requests from carrying the cookie, the token
is the second lock. Bearer-token requests need none (a browser never attaches them by itself).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Request

from dicom_ai_node.api.context import AdminContext
from dicom_ai_node.api.security import CSRF_HEADER, SAFE_METHODS, SESSION_COOKIE
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.persistence.accounts import User


@dataclass(frozen=True)
class Principal:
    """The signed-in user and the role this request acts with (a token's role may be below its user's)."""

    user: User
    role: Role
    via: Literal["session", "token"]
    csrf_token: str | None = None  # the session's; None for token requests

    @property
    def username(self) -> str:
        return self.user.username


def get_ctx(request: Request) -> AdminContext:
    ctx: AdminContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AdminContext, Depends(get_ctx)]


def client_ip(request: Request) -> str:
    """The client address as the server saw it. api/server.py trusts X-Forwarded-For only from a proxy on
    the node's own loopback (uvicorn's forwarded_allow_ips), so a remote client cannot choose its address
    (rate limits, the /metrics network check) while a local TLS proxy still passes the real one."""
    return request.client.host if request.client is not None else "unknown"


def record(
    ctx: AdminContext,
    request: Request,
    *,
    actor: str,
    action: str,
    target: str = "",
    outcome: str = "ok",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One audit event. Never pass passwords, token secrets or cookie values in `detail`."""
    ctx.audit.record(
        actor=actor[:64],
        source=client_ip(request)[:64],
        action=action,
        target=target[:255],
        outcome=outcome,
        detail=detail,
    )


def _bearer_secret(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise HTTPException(401, "unsupported Authorization header; use 'Bearer <token>'")
    return secret.strip()


def authenticate(request: Request, ctx: AdminContext) -> Principal | None:
    """The principal of a request, or None when it carries no valid credentials.

    A present but wrong Authorization header is final (no falling back to the cookie): a script with a
    revoked token must learn so instead of riding on a browser session.
    """
    secret = _bearer_secret(request)
    if secret is not None:
        found = ctx.accounts.authenticate_token(secret)
        if found is None:
            return None
        user, token = found
        role = token.role if token.role.rank <= user.role.rank else user.role
        return Principal(user, role, "token")
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    session = ctx.accounts.get_session(cookie, idle_s=ctx.auth.idle_s)
    if session is None:
        return None
    return Principal(session.user, session.user.role, "session", session.csrf_token)


def current_principal(request: Request, ctx: CtxDep) -> Principal:
    """Any signed-in user; enforces CSRF for cookie-authenticated unsafe methods."""
    principal = authenticate(request, ctx)
    if principal is None:
        raise HTTPException(401, "sign in first", headers={"WWW-Authenticate": "Bearer"})
    if principal.via == "session" and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        expected = principal.csrf_token or ""
        if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
            record(
                ctx,
                request,
                actor=principal.username,
                action="auth.csrf_failed",
                target=request.url.path,
                outcome="denied",
                detail={"method": request.method, "header": "missing" if not sent else "wrong"},
            )
            raise HTTPException(403, "CSRF token missing or wrong")
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def require_role(needed: Role) -> Callable[..., Principal]:
    """A dependency admitting principals whose role allows `needed`; others get 403 (audited)."""

    def check(request: Request, ctx: CtxDep, principal: CurrentUser) -> Principal:
        if not principal.role.allows(needed):
            record(
                ctx,
                request,
                actor=principal.username,
                action="auth.denied",
                target=request.url.path,
                outcome="denied",
                detail={"method": request.method, "role": principal.role.value, "needed": needed.value},
            )
            raise HTTPException(403, f"needs role {needed.value}")
        return principal

    return check


Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require_role(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
