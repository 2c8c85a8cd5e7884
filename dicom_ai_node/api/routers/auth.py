"""Sign-in and sign-out with a session cookie; who am I; whether the node has any users yet."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, HTTPException, Request, Response

from dicom_ai_node.api.context import AdminContext
from dicom_ai_node.api.deps import CtxDep, CurrentUser, client_ip, record
from dicom_ai_node.api.schemas import (
    AuthStatus,
    LoginRequest,
    LoginResponse,
    MeResponse,
    NodePublic,
    UserPublic,
)
from dicom_ai_node.api.security import SESSION_COOKIE
from dicom_ai_node.domain.auth import Role

router = APIRouter(prefix="/api/auth", tags=["auth"])

WRONG_CREDENTIALS = "wrong user name or password"


@router.get("/status")
def status(ctx: CtxDep) -> AuthStatus:
    """Open: the page says "create the first admin with the CLI" when there is no user yet."""
    return AuthStatus(users_exist=ctx.accounts.count_users() > 0, tls=ctx.auth.secure_cookie)


def _locked_out(ctx: CtxDep, username: str, source: str) -> bool:
    """Too many failures for this user name, or from this address (a spray over many names)."""
    limit = ctx.auth.login_max_failures
    since = ctx.clock() - timedelta(seconds=ctx.auth.login_window_s)
    if ctx.audit.count(action="auth.login_failed", since=since, actor=username) >= limit:
        return True
    return ctx.audit.count(action="auth.login_failed", since=since, source=source) >= 3 * limit


@router.post(
    "/login",
    responses={
        401: {"description": WRONG_CREDENTIALS},
        403: {"description": "a sender account cannot sign in"},
        429: {"description": "too many failed sign-ins"},
    },
)
def login(body: LoginRequest, request: Request, response: Response, ctx: CtxDep) -> LoginResponse:
    source = client_ip(request)
    # Checked before the password: a locked-out guesser learns nothing, right or wrong.
    if _locked_out(ctx, body.username, source):
        record(ctx, request, actor=body.username, action="auth.login_locked", outcome="denied")
        raise HTTPException(
            429,
            "too many failed sign-ins; try again later",
            headers={"Retry-After": str(max(1, int(ctx.auth.login_window_s)))},
        )
    user = ctx.accounts.authenticate(body.username, body.password)
    if user is None:
        record(ctx, request, actor=body.username, action="auth.login_failed", outcome="failed")
        raise HTTPException(401, WRONG_CREDENTIALS)
    if user.role is Role.SENDER:
        # A sender account reads nothing: a page session would only meet 403s. It sends with a token.
        record(ctx, request, actor=user.username, action="auth.login_failed", outcome="denied")
        raise HTTPException(403, "this account only sends studies (STOW-RS with an API token)")
    previous = request.cookies.get(SESSION_COOKIE)
    if previous:  # signing in again replaces the browser's session instead of leaving it alive
        ctx.accounts.delete_session(previous)
    cookie, session = ctx.accounts.create_session(
        user, source=source, idle_s=ctx.auth.idle_s, max_age_s=ctx.auth.max_age_s
    )
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(ctx.auth.max_age_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=ctx.auth.secure_cookie,
    )
    record(ctx, request, actor=user.username, action="auth.login", target=user.username)
    return LoginResponse(
        user=UserPublic.model_validate(user), csrf_token=session.csrf_token, node=node_public(ctx)
    )


@router.post("/logout", status_code=204, response_class=Response)
def logout(request: Request, ctx: CtxDep, principal: CurrentUser) -> Response:
    """Ends the browser session (a token request has none to end; revoke the token instead)."""
    response = Response(status_code=204)
    if principal.via == "session":
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            ctx.accounts.delete_session(cookie)
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=ctx.auth.secure_cookie
        )
        record(ctx, request, actor=principal.username, action="auth.logout", target=principal.username)
    return response


@router.get("/me")
def me(ctx: CtxDep, principal: CurrentUser) -> MeResponse:
    return MeResponse(
        user=UserPublic.model_validate(principal.user),
        csrf_token=principal.csrf_token,
        auth=principal.via,
        node=node_public(ctx),
    )


def node_public(ctx: AdminContext) -> NodePublic:
    return NodePublic(version=ctx.version, ae_title=ctx.ae_title, dicom_port=ctx.dicom_port)
