"""Every route of the admin API against its access rule: enumerated from the app itself, so a new route
that nobody classified fails here instead of shipping unprotected."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Mount

from dicom_ai_node.api.security import SESSION_COOKIE
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.domain.catalog import AuthSettings
from tests.support.admin_api import CT_SERIES, PASSWORD, ApiEnv, make_api

OPEN, ANY = "open", "any"
# STOW-RS receive: an API token (never a page session) whose role may store: sender, operator or admin.
STOW = "stow"
VIEWER, OPERATOR, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN

# (method, path) -> who may call it. "any": any signed-in user; /metrics is open only to allowed networks.
ROUTES: dict[tuple[str, str], str | Role] = {
    ("GET", "/"): OPEN,
    ("MOUNT", "/static"): OPEN,
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/metrics"): ANY,
    ("GET", "/openapi.json"): ANY,
    ("GET", "/api/auth/status"): OPEN,
    ("POST", "/api/auth/login"): OPEN,
    ("POST", "/api/auth/logout"): ANY,
    ("GET", "/api/auth/me"): ANY,
    ("GET", "/api/jobs"): VIEWER,
    ("GET", "/api/jobs/{job_id}"): VIEWER,
    ("POST", "/api/jobs/{job_id}/retry"): OPERATOR,
    ("POST", "/api/jobs/{job_id}/rerun"): OPERATOR,
    ("POST", "/api/jobs/{job_id}/cancel"): OPERATOR,
    ("POST", "/api/dead-letter/replay"): OPERATOR,
    ("GET", "/api/series"): VIEWER,
    ("GET", "/api/series/{series_instance_uid}"): VIEWER,
    ("GET", "/api/rules"): VIEWER,
    ("POST", "/api/rules"): ADMIN,
    ("GET", "/api/rules/export"): VIEWER,
    ("POST", "/api/rules/import"): ADMIN,
    ("POST", "/api/rules/validate"): VIEWER,
    ("POST", "/api/rules/dry-run"): VIEWER,
    ("POST", "/api/rules/replay"): VIEWER,
    ("GET", "/api/rules/{rule_id}"): VIEWER,
    ("PUT", "/api/rules/{rule_id}"): ADMIN,
    ("DELETE", "/api/rules/{rule_id}"): ADMIN,
    ("POST", "/api/rules/{rule_id}/rollback"): ADMIN,
    ("GET", "/api/rules/{rule_id}/versions/{version}"): VIEWER,
    ("GET", "/api/rules/{rule_id}/diff"): VIEWER,
    ("GET", "/api/destinations"): VIEWER,
    ("POST", "/api/destinations/{name}/test"): OPERATOR,
    ("GET", "/api/sources"): VIEWER,
    ("POST", "/api/sources/{name}/find"): OPERATOR,
    ("POST", "/api/pull"): OPERATOR,
    ("GET", "/api/models"): VIEWER,
    ("GET", "/api/audit"): ADMIN,
    ("GET", "/api/audit/export"): ADMIN,
    ("GET", "/api/users"): ADMIN,
    ("POST", "/api/users"): ADMIN,
    ("PATCH", "/api/users/{username}"): ADMIN,
    ("GET", "/api/tokens"): ADMIN,
    ("POST", "/api/tokens"): ADMIN,
    ("POST", "/api/tokens/{token_id}/revoke"): ADMIN,
    ("POST", "/dicom-web/studies"): STOW,
    ("POST", "/dicom-web/studies/{study}"): STOW,
}
PATH_VALUES = {
    "job_id": "1",
    "series_instance_uid": CT_SERIES,
    "rule_id": "ct-chest-lungs",
    "version": "1",
    "name": "pacs",
    "token_id": "1",
    "username": "viewer",
    "study": "1.2.3",
}
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
LOWER = {OPERATOR: VIEWER, ADMIN: OPERATOR}


@pytest.fixture
def env(tmp_path: Path) -> ApiEnv:
    return make_api(tmp_path, AuthSettings(idle_s=600, max_age_s=3600))


def _walk(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, Mount):
            yield "MOUNT", prefix + route.path
        elif isinstance(route, APIRoute):
            yield from ((method, prefix + route.path) for method in route.methods or ())
        elif hasattr(route, "original_router"):  # FastAPI >= 0.160 keeps included routers as branches
            branch: Any = route  # that branch type is not public API: read its two attributes untyped
            yield from _walk(branch.original_router.routes, prefix + branch.include_context.prefix)
        else:  # a plain starlette Route would bypass the auth dependencies: refuse it
            raise AssertionError(f"unexpected route type {type(route).__name__} at {route!r}")


def _app_routes(env: ApiEnv) -> set[tuple[str, str]]:
    return set(_walk(env.app.routes))


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)


def _protected() -> list[tuple[str, str, str | Role]]:
    return [(m, p, who) for (m, p), who in ROUTES.items() if who != OPEN]


def test_every_route_is_classified(env: ApiEnv) -> None:
    found = _app_routes(env)
    assert found - ROUTES.keys() == set(), "classify the new routes in ROUTES"
    assert ROUTES.keys() - found == set(), "ROUTES names routes the app no longer has"


def test_no_credentials_is_401_on_every_protected_route(env: ApiEnv) -> None:
    client = env.client()
    forged = env.client(cookies={"ainode_session": "forged"})
    for method, path, _ in _protected():
        r = client.request(method, _url(path))
        assert r.status_code == 401, (method, path, r.status_code)
        bad = client.request(method, _url(path), headers={"Authorization": "Bearer ainode_not-a-token"})
        assert bad.status_code == 401, (method, path)
        cookie = forged.request(method, _url(path))
        assert cookie.status_code == 401, (method, path)


def test_a_role_too_low_is_403_on_every_route_and_audited(env: ApiEnv) -> None:
    headers = {role: env.token(role.value) for role in Role}
    checked = 0
    for method, path, who in _protected():
        if not isinstance(who, Role) or who not in LOWER:
            continue
        r = env.client().request(method, _url(path), headers=headers[LOWER[who]])
        assert r.status_code == 403 and r.json() == {"detail": f"needs role {who.value}"}, (method, path)
        checked += 1
    for method, path, who in _protected():
        if who == STOW:  # the one right a viewer lacks that a sender has
            r = env.client().request(method, _url(path), headers=headers[VIEWER])
            assert r.status_code == 403 and r.json() == {"detail": "needs role sender, operator or admin"}
            checked += 1
    denied = env.ctx.audit.list_events(action="auth.denied", limit=1000)
    assert len(denied) == checked and {e.outcome for e in denied} == {"denied"}
    # And the viewer, signed in with the page's cookie and CSRF token, on every write.
    page = env.client()
    page.headers["X-CSRF-Token"] = env.sign_in(page, "viewer")
    writes = [(m, p) for m, p, who in _protected() if m in UNSAFE and isinstance(who, Role) and who != VIEWER]
    for method, path in writes:
        assert page.request(method, _url(path)).status_code == 403, (method, path)
    # The viewer may write nothing except the three read-only tools.
    viewer_writes = {(m, p) for m, p, who in _protected() if m in UNSAFE and who == VIEWER}
    assert viewer_writes == {
        ("POST", "/api/rules/validate"),
        ("POST", "/api/rules/dry-run"),
        ("POST", "/api/rules/replay"),
    }


def test_session_writes_need_the_csrf_token(env: ApiEnv) -> None:
    client = env.client()
    csrf = env.sign_in(client, "admin")
    unsafe = [(m, p) for m, p, who in _protected() if m in UNSAFE and who != STOW]
    assert len(unsafe) > 15
    # STOW-RS takes no session at all (so CSRF does not arise): a signed-in page gets 401.
    for method, path, _ in [r for r in _protected() if r[2] == STOW]:
        assert client.request(method, _url(path), headers={"X-CSRF-Token": csrf}).status_code == 401
    for method, path in unsafe:
        missing = client.request(method, _url(path))
        assert missing.status_code == 403 and missing.json() == {"detail": "CSRF token missing or wrong"}, (
            path
        )
        wrong = client.request(method, _url(path), headers={"X-CSRF-Token": csrf[:-2] + "xx"})
        assert wrong.status_code == 403, (method, path)
    assert len(env.ctx.audit.list_events(action="auth.csrf_failed", limit=1000)) == 2 * len(unsafe)
    # With the token the request gets past authentication (to its own answer).
    r = client.post("/api/rules/validate", json={"rule": {}}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    # Safe methods need no token; a bearer token needs none either.
    assert client.get("/api/jobs").status_code == 200
    script = env.client(headers=env.token("admin"))
    assert script.post("/api/rules/validate", json={"rule": {}}).status_code == 200


def test_revoked_and_expired_tokens_are_refused(env: ApiEnv) -> None:
    secret, token = env.ctx.accounts.create_token("operator", "script")
    client = env.client(headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/api/jobs").status_code == 200
    env.ctx.accounts.revoke_token(token.id)
    assert client.get("/api/jobs").status_code == 401
    soon = env.clock() + (env.clock() - env.clock().replace(hour=0))  # later today
    secret, _ = env.ctx.accounts.create_token("operator", "short", expires_at=soon)
    client = env.client(headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/api/jobs").status_code == 200
    env.clock.advance((soon - env.clock()).total_seconds() + 1)
    assert client.get("/api/jobs").status_code == 401
    # A disabled user's tokens stop working too.
    secret, _ = env.ctx.accounts.create_token("viewer", "v")
    env.ctx.accounts.update_user("viewer", disabled=True)
    assert env.client(headers={"Authorization": f"Bearer {secret}"}).get("/api/jobs").status_code == 401


def test_expired_session_is_refused(env: ApiEnv) -> None:
    client = env.client()
    env.sign_in(client, "viewer")
    env.clock.advance(601)  # idle_s = 600
    assert client.get("/api/jobs").status_code == 401
    env.sign_in(client, "viewer")
    for _ in range(7):
        env.clock.advance(550)
        client.get("/api/auth/me")
    assert client.get("/api/jobs").status_code == 401  # max_age_s = 3600 passed


def test_open_routes_answer_without_credentials(env: ApiEnv) -> None:
    client = env.client()
    assert client.get("/").status_code == 200
    assert client.get("/static/index.html").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/api/auth/status").status_code == 200
    assert (
        client.post("/api/auth/login", json={"username": "viewer", "password": PASSWORD}).status_code == 200
    )
    # Login needs a JSON body (a cross-site form post cannot send one).
    form = env.client().post("/api/auth/login", data={"username": "viewer", "password": PASSWORD})
    assert form.status_code == 422
    assert env.client(client=("127.0.0.1", 40000)).get("/metrics").status_code == 200


def test_security_headers_on_every_kind_of_response(env: ApiEnv) -> None:
    client = env.client()
    answers = [
        client.get("/"),
        client.get("/static/index.html"),
        client.get("/healthz"),
        client.get("/api/jobs"),  # 401
        client.get("/nowhere"),  # 404
        client.post("/api/auth/login", json={}),  # 422
    ]
    for r in answers:
        assert r.headers["content-security-policy"] == (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ), r.url
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-frame-options"] == "DENY"
    assert answers[3].headers["cache-control"] == "no-store"
    assert answers[5].headers["cache-control"] == "no-store"
    # The 422 does not echo what was sent (it may be a password).
    r = client.post("/api/auth/login", json={"username": "viewer", "password": ["secret-in-a-list"]})
    assert r.status_code == 422 and "secret-in-a-list" not in r.text


def test_a_sender_account_cannot_sign_into_the_page(env: ApiEnv) -> None:
    """A sender reads nothing, so a page session would only meet 403s: sign-in is refused, audited."""
    env.ctx.accounts.create_user("ct-room-1", Role.SENDER, PASSWORD)
    r = env.client().post("/api/auth/login", json={"username": "ct-room-1", "password": PASSWORD})
    assert r.status_code == 403 and "STOW-RS" in r.json()["detail"]
    assert SESSION_COOKIE not in r.cookies
    [event] = env.ctx.audit.list_events(action="auth.login_failed")
    assert (event.actor, event.outcome) == ("ct-room-1", "denied")
