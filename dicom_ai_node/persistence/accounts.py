"""Users, browser sessions and API tokens of the admin page and API (DESIGN.md, "Control plane").

Secrets never reach the database in a usable form: passwords are argon2id hashes, and session cookies and
API tokens are stored as the sha256 of a 256-bit random value (a random secret needs no slow hash; a
leaked table hands out no live session or token). There is no default account: the first admin is made
with ``dicom-ai-node users add``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from dicom_ai_node.domain.auth import Role
from dicom_ai_node.errors import AccountError
from dicom_ai_node.persistence._common import Clock, utcnow
from dicom_ai_node.persistence.tables import api_tokens, sessions, users

MIN_PASSWORD_LENGTH = 12
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
TOKEN_SECRET_PREFIX = "ainode_"
# Shown in token lists so admins can tell tokens apart: "ainode_" + 7 random characters (42 bits).
TOKEN_PREFIX_LENGTH = 14
TOKEN_NAME_MAX = 64
# Writing last_seen_at / last_used_at on every request would turn each page poll into a write.
SESSION_TOUCH_S = 30.0
TOKEN_TOUCH_S = 60.0
_SOURCE_MAX = 64


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: Role
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True)
class Session:
    id: str  # sha256 hex of the cookie value
    user: User
    csrf_token: str
    source: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class ApiToken:
    id: int
    user_id: int
    username: str
    name: str
    role: Role
    token_prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _lower(a: Role, b: Role) -> Role:
    return a if a.rank <= b.rank else b


def check_username(username: str) -> None:
    if not USERNAME_PATTERN.fullmatch(username):
        raise AccountError("user name must be 1-64 characters of letters, digits and _ . @ -")


def check_password(username: str, password: str) -> None:
    """Length is what makes a password strong; composition rules only make people write them down."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if password.casefold() == username.casefold():
        raise AccountError("password must not be the user name")


class AccountRepository:
    """The only reader and writer of users, sessions and api_tokens.

    `hasher` defaults to argon2-cffi's argon2id parameters (RFC 9106 low-memory profile); tests pass a
    cheap one. Hashes made with other parameters are upgraded at the next successful sign-in.
    """

    def __init__(
        self, engine: sa.Engine, clock: Clock = utcnow, hasher: PasswordHasher | None = None
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._hasher = hasher or PasswordHasher()
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    # -- users -------------------------------------------------------------------------------------

    def count_users(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())

    def create_user(self, username: str, role: Role, password: str) -> User:
        check_username(username)
        check_password(username, password)
        role = Role(role)
        now = self._clock()
        stmt = (
            sa.insert(users)
            .values(
                username=username,
                role=role.value,
                password_hash=self._hasher.hash(password),
                disabled=False,
                created_at=now,
                updated_at=now,
            )
            .returning(*users.c)
        )
        try:
            with self._engine.begin() as conn:
                row = conn.execute(stmt).mappings().one()
        except sa.exc.IntegrityError:
            # The unique constraint decides, so two admins adding the same name at once get one user.
            raise AccountError(f"user '{username}' already exists") from None
        return _user(row)

    def list_users(self) -> list[User]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(users).order_by(users.c.username)).mappings().all()
        return [_user(r) for r in rows]

    def get_user(self, username: str) -> User | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.username == username)).mappings().one_or_none()
        return _user(row) if row is not None else None

    def update_user(
        self,
        username: str,
        *,
        role: Role | None = None,
        disabled: bool | None = None,
        password: str | None = None,
    ) -> User:
        """Change a user. Disabling it or setting its password signs it out everywhere (its sessions are
        deleted); a disabled user's API tokens stop working too (checked at each use)."""
        values: dict[str, Any] = {"updated_at": self._clock()}
        if role is not None:
            values["role"] = Role(role).value
        if disabled is not None:
            values["disabled"] = disabled
        if password is not None:
            check_password(username, password)
            values["password_hash"] = self._hasher.hash(password)
        with self._engine.begin() as conn:
            row = (
                conn.execute(
                    sa.update(users).where(users.c.username == username).values(**values).returning(*users.c)
                )
                .mappings()
                .one_or_none()
            )
            if row is None:
                raise AccountError(f"no user '{username}'")
            if disabled or password is not None:
                conn.execute(sa.delete(sessions).where(sessions.c.user_id == row["id"]))
        return _user(row)

    def authenticate(self, username: str, password: str) -> User | None:
        """The user when `password` is right and the user is enabled, else None.

        An unknown user name still costs one argon2 verification, so response time does not tell
        which user names exist.
        """
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.username == username)).mappings().one_or_none()
        stored = row["password_hash"] if row is not None else self._dummy()
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None or row["disabled"]:
            return None
        now = self._clock()
        values: dict[str, Any] = {"last_login_at": now}
        if self._hasher.check_needs_rehash(stored):
            values["password_hash"] = self._hasher.hash(password)
        with self._engine.begin() as conn:
            updated = (
                conn.execute(
                    sa.update(users)
                    # Guarded: a password change or disable that raced this sign-in wins.
                    .where(
                        users.c.id == row["id"],
                        users.c.password_hash == stored,
                        users.c.disabled.is_(False),
                    )
                    .values(**values)
                    .returning(*users.c)
                )
                .mappings()
                .one_or_none()
            )
        return _user(updated) if updated is not None else None

    def _dummy(self) -> str:
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
            return self._dummy_hash

    # -- sessions ----------------------------------------------------------------------------------

    def create_session(
        self, user: User, *, source: str, idle_s: float, max_age_s: float
    ) -> tuple[str, Session]:
        """A new session for `user`: returns (cookie value, Session). Only the cookie's sha256 is stored.

        `max_age_s` fixes `expires_at`; `idle_s` is enforced by `get_session` (the same value is passed
        there), it is accepted here so callers state both limits where a session starts.
        """
        if idle_s <= 0 or max_age_s <= 0:
            raise ValueError("session idle_s and max_age_s must be positive")
        cookie = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(
            id=_sha256(cookie),
            user=user,
            csrf_token=secrets.token_urlsafe(32),
            source=source[:_SOURCE_MAX],
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=max_age_s),
        )
        with self._engine.begin() as conn:
            conn.execute(
                sa.insert(sessions).values(
                    id=session.id,
                    user_id=user.id,
                    csrf_token=session.csrf_token,
                    source=session.source,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=session.expires_at,
                )
            )
        return cookie, session

    def get_session(self, cookie_value: str, *, idle_s: float) -> Session | None:
        """The live session for a cookie value, or None (unknown, expired, idle too long, user disabled).

        An expired or idle session is deleted. The returned Session carries the user as it is now (role
        changes apply at once).
        """
        session_id = _sha256(cookie_value)
        now = self._clock()
        query = (
            sa.select(sessions, *_user_columns())
            .join(users, users.c.id == sessions.c.user_id)
            .where(sessions.c.id == session_id)
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        if row is None or not hmac.compare_digest(row["id"], session_id):
            return None
        if row["expires_at"] <= now or (now - row["last_seen_at"]).total_seconds() > idle_s:
            with self._engine.begin() as conn:
                conn.execute(sa.delete(sessions).where(sessions.c.id == session_id))
            return None
        if row["u_disabled"]:
            return None
        last_seen = row["last_seen_at"]
        if (now - last_seen).total_seconds() >= SESSION_TOUCH_S:
            with self._engine.begin() as conn:
                conn.execute(sa.update(sessions).where(sessions.c.id == session_id).values(last_seen_at=now))
            last_seen = now
        return Session(
            id=session_id,
            user=_user_from_prefixed(row),
            csrf_token=row["csrf_token"],
            source=row["source"],
            created_at=row["created_at"],
            last_seen_at=last_seen,
            expires_at=row["expires_at"],
        )

    def delete_session(self, cookie_value: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.delete(sessions).where(sessions.c.id == _sha256(cookie_value)))

    def delete_expired_sessions(self) -> int:
        with self._engine.begin() as conn:
            return int(
                conn.execute(sa.delete(sessions).where(sessions.c.expires_at <= self._clock())).rowcount
            )

    # -- API tokens --------------------------------------------------------------------------------

    def create_token(
        self,
        username: str,
        name: str,
        role: Role | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, ApiToken]:
        """A new API token for `username`: returns (secret, ApiToken). The secret is shown once; only its
        sha256 is stored. The token's role defaults to the user's and may not exceed it."""
        name = name.strip()
        if not name or len(name) > TOKEN_NAME_MAX:
            raise AccountError(f"token name must be 1-{TOKEN_NAME_MAX} characters")
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise AccountError("token expiry must be in the future")
        user = self.get_user(username)
        if user is None:
            raise AccountError(f"no user '{username}'")
        if user.disabled:
            raise AccountError(f"user '{username}' is disabled")
        token_role = Role(role) if role is not None else user.role
        if not user.role.allows(token_role):
            raise AccountError(f"a token of user '{username}' ({user.role}) cannot have role {token_role}")
        secret = TOKEN_SECRET_PREFIX + secrets.token_urlsafe(32)
        stmt = (
            sa.insert(api_tokens)
            .values(
                user_id=user.id,
                name=name,
                role=token_role.value,
                token_hash=_sha256(secret),
                token_prefix=secret[:TOKEN_PREFIX_LENGTH],
                created_at=now,
                expires_at=expires_at,
            )
            .returning(*api_tokens.c)
        )
        with self._engine.begin() as conn:
            row = conn.execute(stmt).mappings().one()
        return secret, _token(row, user.username)

    def list_tokens(self, username: str | None = None) -> list[ApiToken]:
        query = sa.select(api_tokens, users.c.username).join(users, users.c.id == api_tokens.c.user_id)
        if username is not None:
            query = query.where(users.c.username == username)
        with self._engine.connect() as conn:
            rows = conn.execute(query.order_by(api_tokens.c.id)).mappings().all()
        return [_token(r, r["username"]) for r in rows]

    def get_token(self, token_id: int) -> ApiToken | None:
        query = (
            sa.select(api_tokens, users.c.username)
            .join(users, users.c.id == api_tokens.c.user_id)
            .where(api_tokens.c.id == token_id)
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return _token(row, row["username"]) if row is not None else None

    def revoke_token(self, token_id: int) -> bool:
        """Revoke a token for good; False when it is unknown or already revoked."""
        stmt = (
            sa.update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=self._clock())
        )
        with self._engine.begin() as conn:
            return int(conn.execute(stmt).rowcount) == 1

    def authenticate_token(self, secret: str) -> tuple[User, ApiToken] | None:
        """The (user, token) a bearer secret belongs to, or None (unknown, revoked, expired, user disabled).

        Both returned objects carry the effective role, the lower of the token's and the user's current
        role, so a demoted user's tokens are demoted too.
        """
        if not secret.startswith(TOKEN_SECRET_PREFIX):
            return None
        token_hash = _sha256(secret)
        now = self._clock()
        query = (
            sa.select(api_tokens, *_user_columns())
            .join(users, users.c.id == api_tokens.c.user_id)
            .where(api_tokens.c.token_hash == token_hash)
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        if row is None or not hmac.compare_digest(row["token_hash"], token_hash):
            return None
        if row["revoked_at"] is not None or row["u_disabled"]:
            return None
        if row["expires_at"] is not None and row["expires_at"] <= now:
            return None
        last_used = row["last_used_at"]
        if last_used is None or (now - last_used).total_seconds() >= TOKEN_TOUCH_S:
            with self._engine.begin() as conn:
                conn.execute(
                    sa.update(api_tokens).where(api_tokens.c.id == row["id"]).values(last_used_at=now)
                )
            last_used = now
        user = _user_from_prefixed(row)
        token = _token(row, user.username)
        effective = _lower(token.role, user.role)
        return replace(user, role=effective), replace(token, role=effective, last_used_at=last_used)


def _user_columns() -> list[sa.Label[Any]]:
    return [c.label(f"u_{c.name}") for c in users.c if c.name != "password_hash"]


def _user(row: Any) -> User:
    return User(
        id=row["id"],
        username=row["username"],
        role=Role(row["role"]),
        disabled=bool(row["disabled"]),
        created_at=row["created_at"],
        last_login_at=row["last_login_at"],
    )


def _user_from_prefixed(row: Any) -> User:
    return User(
        id=row["u_id"],
        username=row["u_username"],
        role=Role(row["u_role"]),
        disabled=bool(row["u_disabled"]),
        created_at=row["u_created_at"],
        last_login_at=row["u_last_login_at"],
    )


def _token(row: Any, username: str) -> ApiToken:
    return ApiToken(
        id=row["id"],
        user_id=row["user_id"],
        username=username,
        name=row["name"],
        role=Role(row["role"]),
        token_prefix=row["token_prefix"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )
