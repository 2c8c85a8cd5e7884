"""Users, sessions and API tokens: identical behaviour on SQLite and PostgreSQL (see conftest.engine)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher

from dicom_ai_node.domain.auth import Role
from dicom_ai_node.errors import AccountError
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.tables import api_tokens, sessions, users
from tests.contract.conftest import FakeClock

PASSWORD = "correct horse battery"
IDLE_S, MAX_AGE_S = 1800.0, 12 * 3600.0


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def accounts(engine: sa.Engine, clock: FakeClock) -> AccountRepository:
    return AccountRepository(engine, clock=clock, hasher=cheap_hasher())


def test_create_and_list_users(accounts: AccountRepository, clock: FakeClock) -> None:
    assert accounts.count_users() == 0
    alice = accounts.create_user("alice", Role.ADMIN, PASSWORD)
    accounts.create_user("bob.s@site-1", Role.VIEWER, PASSWORD)
    assert accounts.count_users() == 2
    assert (alice.username, alice.role, alice.disabled) == ("alice", Role.ADMIN, False)
    assert alice.created_at == clock.now and alice.last_login_at is None
    assert [u.username for u in accounts.list_users()] == ["alice", "bob.s@site-1"]
    assert accounts.get_user("alice") == alice
    assert accounts.get_user("nobody") is None


def test_password_is_stored_as_argon2id_only(accounts: AccountRepository, engine: sa.Engine) -> None:
    accounts.create_user("alice", Role.ADMIN, PASSWORD)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(users.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("alice", "short", "at least 12 characters"),
        ("alice-the-admin", "Alice-The-Admin", "must not be the user name"),
        ("bad name", PASSWORD, "user name must be"),
        ("", PASSWORD, "user name must be"),
        ("x" * 65, PASSWORD, "user name must be"),
        ("ali/ce", PASSWORD, "user name must be"),
    ],
)
def test_create_user_refuses_bad_input(
    accounts: AccountRepository, username: str, password: str, message: str
) -> None:
    with pytest.raises(AccountError, match=message):
        accounts.create_user(username, Role.VIEWER, password)
    assert accounts.count_users() == 0


def test_duplicate_user_is_refused(accounts: AccountRepository) -> None:
    accounts.create_user("alice", Role.ADMIN, PASSWORD)
    with pytest.raises(AccountError, match="already exists"):
        accounts.create_user("alice", Role.VIEWER, PASSWORD + "x")
    assert accounts.count_users() == 1


def test_authenticate(accounts: AccountRepository, clock: FakeClock) -> None:
    accounts.create_user("alice", Role.OPERATOR, PASSWORD)
    clock.advance(60)
    user = accounts.authenticate("alice", PASSWORD)
    assert user is not None and user.role is Role.OPERATOR and user.last_login_at == clock.now
    stored = accounts.get_user("alice")
    assert stored is not None and stored.last_login_at == clock.now
    assert accounts.authenticate("alice", PASSWORD + "!") is None
    assert accounts.authenticate("nobody", PASSWORD) is None
    accounts.update_user("alice", disabled=True)
    assert accounts.authenticate("alice", PASSWORD) is None
    accounts.update_user("alice", disabled=False)
    assert accounts.authenticate("alice", PASSWORD) is not None


def test_hash_is_upgraded_when_parameters_change(engine: sa.Engine, clock: FakeClock) -> None:
    AccountRepository(engine, clock=clock, hasher=cheap_hasher()).create_user("alice", Role.ADMIN, PASSWORD)
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    accounts = AccountRepository(engine, clock=clock, hasher=stronger)
    assert accounts.authenticate("alice", PASSWORD) is not None
    with engine.connect() as conn:
        stored = conn.execute(sa.select(users.c.password_hash)).scalar_one()
    assert not stronger.check_needs_rehash(stored)
    assert accounts.authenticate("alice", PASSWORD) is not None


def test_update_user(accounts: AccountRepository) -> None:
    accounts.create_user("alice", Role.ADMIN, PASSWORD)
    changed = accounts.update_user("alice", role=Role.VIEWER)
    assert changed.role is Role.VIEWER
    changed = accounts.update_user("alice", password="another long password")
    assert accounts.authenticate("alice", PASSWORD) is None
    assert accounts.authenticate("alice", "another long password") is not None
    with pytest.raises(AccountError, match="at least 12"):
        accounts.update_user("alice", password="short")
    with pytest.raises(AccountError, match="no user"):
        accounts.update_user("nobody", role=Role.ADMIN)


def test_session_lifecycle(accounts: AccountRepository, engine: sa.Engine, clock: FakeClock) -> None:
    user = accounts.create_user("alice", Role.ADMIN, PASSWORD)
    cookie, session = accounts.create_session(user, source="10.0.0.5", idle_s=IDLE_S, max_age_s=MAX_AGE_S)
    assert len(cookie) >= 43 and session.id == hashlib.sha256(cookie.encode()).hexdigest()
    assert session.expires_at == clock.now + timedelta(seconds=MAX_AGE_S)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sessions.c.id, sessions.c.csrf_token)).one()
    # Only the hash of the cookie is stored.
    assert stored.id == session.id and stored.id != cookie

    clock.advance(10)
    found = accounts.get_session(cookie, idle_s=IDLE_S)
    assert found is not None and found.user.username == "alice" and found.csrf_token == session.csrf_token
    # last_seen_at is written at most every 30 s.
    assert found.source == "10.0.0.5" and found.last_seen_at == session.created_at
    clock.advance(30)
    found = accounts.get_session(cookie, idle_s=IDLE_S)
    assert found is not None and found.last_seen_at == clock.now
    assert accounts.get_session("not-a-cookie", idle_s=IDLE_S) is None
    assert accounts.get_session(session.id, idle_s=IDLE_S) is None  # the stored hash is no cookie

    accounts.delete_session(cookie)
    assert accounts.get_session(cookie, idle_s=IDLE_S) is None


def test_session_idle_and_max_age(accounts: AccountRepository, clock: FakeClock) -> None:
    user = accounts.create_user("alice", Role.ADMIN, PASSWORD)
    idle_cookie, _ = accounts.create_session(user, source="", idle_s=IDLE_S, max_age_s=MAX_AGE_S)
    clock.advance(IDLE_S + 1)
    assert accounts.get_session(idle_cookie, idle_s=IDLE_S) is None

    cookie, _ = accounts.create_session(user, source="", idle_s=IDLE_S, max_age_s=MAX_AGE_S)
    for _ in range(int(MAX_AGE_S // 1000)):
        clock.advance(1000)
        assert accounts.get_session(cookie, idle_s=IDLE_S) is not None
    clock.advance(MAX_AGE_S % 1000 + 1)
    assert accounts.get_session(cookie, idle_s=IDLE_S) is None


def test_session_sees_role_changes_and_dies_with_disable_or_password_change(
    accounts: AccountRepository,
) -> None:
    user = accounts.create_user("alice", Role.ADMIN, PASSWORD)
    cookie, _ = accounts.create_session(user, source="", idle_s=IDLE_S, max_age_s=MAX_AGE_S)
    accounts.update_user("alice", role=Role.VIEWER)
    found = accounts.get_session(cookie, idle_s=IDLE_S)
    assert found is not None and found.user.role is Role.VIEWER

    accounts.update_user("alice", disabled=True)
    assert accounts.get_session(cookie, idle_s=IDLE_S) is None
    accounts.update_user("alice", disabled=False)
    assert accounts.get_session(cookie, idle_s=IDLE_S) is None  # deleted, not just hidden

    cookie, _ = accounts.create_session(user, source="", idle_s=IDLE_S, max_age_s=MAX_AGE_S)
    accounts.update_user("alice", password="a brand new password")
    assert accounts.get_session(cookie, idle_s=IDLE_S) is None


def test_delete_expired_sessions(accounts: AccountRepository, clock: FakeClock) -> None:
    user = accounts.create_user("alice", Role.ADMIN, PASSWORD)
    accounts.create_session(user, source="", idle_s=IDLE_S, max_age_s=60)
    live, _ = accounts.create_session(user, source="", idle_s=IDLE_S, max_age_s=600)
    clock.advance(61)
    assert accounts.delete_expired_sessions() == 1
    assert accounts.get_session(live, idle_s=IDLE_S) is not None


def test_tokens(accounts: AccountRepository, engine: sa.Engine, clock: FakeClock) -> None:
    accounts.create_user("alice", Role.OPERATOR, PASSWORD)
    secret, token = accounts.create_token("alice", "stow sender")
    assert secret.startswith("ainode_") and len(secret) >= 7 + 43
    assert token.token_prefix == secret[:14] and token.role is Role.OPERATOR and token.username == "alice"
    with engine.connect() as conn:
        stored = conn.execute(sa.select(api_tokens.c.token_hash)).scalar_one()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()

    viewer_secret, viewer_token = accounts.create_token("alice", "read only", role=Role.VIEWER)
    assert viewer_token.role is Role.VIEWER
    with pytest.raises(AccountError, match="cannot have role admin"):
        accounts.create_token("alice", "too strong", role=Role.ADMIN)
    with pytest.raises(AccountError, match="no user"):
        accounts.create_token("nobody", "x")
    with pytest.raises(AccountError, match="token name"):
        accounts.create_token("alice", "  ")

    assert [t.name for t in accounts.list_tokens()] == ["stow sender", "read only"]
    assert accounts.list_tokens("nobody") == []
    assert accounts.get_token(token.id) == token

    found = accounts.authenticate_token(secret)
    assert found is not None
    user, used = found
    assert user.username == "alice" and used.id == token.id and used.last_used_at == clock.now
    assert accounts.authenticate_token(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert accounts.authenticate_token("Bearer nonsense") is None

    assert accounts.revoke_token(token.id) is True
    assert accounts.revoke_token(token.id) is False
    assert accounts.revoke_token(9999) is False
    assert accounts.authenticate_token(secret) is None
    revoked = accounts.get_token(token.id)
    assert revoked is not None and revoked.revoked_at == clock.now
    assert accounts.authenticate_token(viewer_secret) is not None


def test_token_expiry_last_used_and_effective_role(accounts: AccountRepository, clock: FakeClock) -> None:
    accounts.create_user("alice", Role.ADMIN, PASSWORD)
    secret, token = accounts.create_token("alice", "ci", expires_at=clock.now + timedelta(hours=1))
    first = accounts.authenticate_token(secret)
    assert first is not None and first[1].last_used_at == clock.now
    clock.advance(30)
    again = accounts.authenticate_token(secret)
    assert again is not None and again[1].last_used_at == first[1].last_used_at  # at most every 60 s
    clock.advance(31)
    again = accounts.authenticate_token(secret)
    assert again is not None and again[1].last_used_at == clock.now

    # A demoted user's admin token acts as the lower role.
    accounts.update_user("alice", role=Role.VIEWER)
    demoted = accounts.authenticate_token(secret)
    assert demoted is not None and demoted[0].role is Role.VIEWER and demoted[1].role is Role.VIEWER

    accounts.update_user("alice", disabled=True)
    assert accounts.authenticate_token(secret) is None
    accounts.update_user("alice", disabled=False)
    assert accounts.authenticate_token(secret) is not None

    clock.advance(3600)
    assert accounts.authenticate_token(secret) is None
    with pytest.raises(AccountError, match="future"):
        accounts.create_token("alice", "old", expires_at=clock.now - timedelta(seconds=1))
    assert token.expires_at is not None
