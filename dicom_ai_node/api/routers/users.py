"""User accounts (admin only). Passwords go in, never out: not in answers, logs or the audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request

from dicom_ai_node.api.deps import Admin, CtxDep, record
from dicom_ai_node.api.schemas import UserCreate, UserPublic, UserUpdate
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.errors import AccountError

router = APIRouter(prefix="/api/users", tags=["users"])

UsernamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]


@router.get("")
def list_users(ctx: CtxDep, _: Admin) -> list[UserPublic]:
    return [UserPublic.model_validate(u) for u in ctx.accounts.list_users()]


@router.post("", status_code=201, responses={400: {}, 409: {}})
def create_user(body: UserCreate, request: Request, ctx: CtxDep, principal: Admin) -> UserPublic:
    if ctx.accounts.get_user(body.username) is not None:
        raise HTTPException(409, f"user {body.username!r} exists")
    try:
        user = ctx.accounts.create_user(body.username, body.role, body.password)
    except AccountError as exc:  # weak password, invalid name: the message says which
        raise HTTPException(400, str(exc)) from None
    record(
        ctx,
        request,
        actor=principal.username,
        action="user.create",
        target=user.username,
        detail={"role": user.role.value},
    )
    return UserPublic.model_validate(user)


@router.patch("/{username}", responses={400: {}, 404: {}, 409: {}})
def update_user(
    username: UsernamePath, body: UserUpdate, request: Request, ctx: CtxDep, principal: Admin
) -> UserPublic:
    """Change role, disable/enable, or set a new password (which ends the user's sessions)."""
    if ctx.accounts.get_user(username) is None:
        raise HTTPException(404, f"no user {username!r}")
    # An admin locking themselves out leaves a node nobody can administer from the page.
    if username == principal.username and (
        body.disabled or (body.role is not None and body.role != Role.ADMIN)
    ):
        raise HTTPException(409, "you cannot disable or demote your own account")
    try:
        user = ctx.accounts.update_user(
            username, role=body.role, disabled=body.disabled, password=body.password
        )
    except AccountError as exc:
        raise HTTPException(400, str(exc)) from None
    changes: dict[str, object] = {"password_changed": body.password is not None}
    if body.role is not None:
        changes["role"] = body.role.value
    if body.disabled is not None:
        changes["disabled"] = body.disabled
    record(ctx, request, actor=principal.username, action="user.update", target=username, detail=changes)
    return UserPublic.model_validate(user)
