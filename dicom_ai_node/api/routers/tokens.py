"""API tokens for scripts and STOW-RS senders (admin only). The secret is shown once, at creation."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, HTTPException, Request

from dicom_ai_node.api.deps import Admin, CtxDep, record
from dicom_ai_node.api.params import IdPath, NameQuery
from dicom_ai_node.api.schemas import TokenCreate, TokenCreated, TokenPublic
from dicom_ai_node.errors import AccountError

router = APIRouter(prefix="/api/tokens", tags=["tokens"])


@router.get("")
def list_tokens(ctx: CtxDep, _: Admin, username: NameQuery = None) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t) for t in ctx.accounts.list_tokens(username)]


@router.post("", status_code=201, responses={400: {}, 404: {}})
def create_token(body: TokenCreate, request: Request, ctx: CtxDep, principal: Admin) -> TokenCreated:
    if ctx.accounts.get_user(body.username) is None:
        raise HTTPException(404, f"no user {body.username!r}")
    expires_at = ctx.clock() + timedelta(days=body.expires_days) if body.expires_days is not None else None
    try:
        secret, token = ctx.accounts.create_token(body.username, body.name, body.role, expires_at)
    except AccountError as exc:  # e.g. a role above the user's
        raise HTTPException(400, str(exc)) from None
    record(
        ctx,
        request,
        actor=principal.username,
        action="token.create",
        target=f"token/{token.id}",
        detail={
            "username": token.username,
            "name": token.name,
            "role": token.role.value,
            "prefix": token.token_prefix,
            "expires_at": token.expires_at.isoformat() if token.expires_at else None,
        },
    )
    return TokenCreated(token=TokenPublic.model_validate(token), secret=secret)


@router.post("/{token_id}/revoke", responses={404: {}, 409: {}})
def revoke_token(token_id: IdPath, request: Request, ctx: CtxDep, principal: Admin) -> TokenPublic:
    token = ctx.accounts.get_token(token_id)
    if token is None:
        raise HTTPException(404, f"no token {token_id}")
    if token.revoked_at is not None or not ctx.accounts.revoke_token(token_id):
        raise HTTPException(409, f"token {token_id} is already revoked")
    record(
        ctx,
        request,
        actor=principal.username,
        action="token.revoke",
        target=f"token/{token_id}",
        detail={"username": token.username, "name": token.name, "prefix": token.token_prefix},
    )
    revoked = ctx.accounts.get_token(token_id)
    return TokenPublic.model_validate(revoked if revoked is not None else token)
