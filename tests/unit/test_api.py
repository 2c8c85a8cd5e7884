"""Admin API flows against a real SQLite database (FastAPI TestClient, cheap argon2 hasher, fake clock)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from dicom_ai_node.domain.catalog import AuthSettings
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.queue import JobQueue
from tests.support.admin_api import CT_SERIES, PASSWORD, ApiEnv, make_api

NEW_RULE: dict[str, Any] = {
    "id": "ct-any",
    "description": "every CT",
    "conditions": [{"attribute": "Modality", "equals": "CT"}],
    "action": {"model": "ct-lung-classical", "destinations": ["pacs"], "priority": 1},
}


@pytest.fixture
def env(tmp_path: Path) -> ApiEnv:
    return make_api(tmp_path)


@pytest.fixture
def admin(env: ApiEnv) -> TestClient:
    """Signed in with the session cookie; the CSRF token is a default header."""
    client = env.client()
    client.headers["X-CSRF-Token"] = env.sign_in(client, "admin")
    return client


def _audit(env: ApiEnv, action: str) -> list[Any]:
    return env.ctx.audit.list_events(action=action, limit=1000)


# -- sign-in -------------------------------------------------------------------------------------------


def test_login_me_logout(env: ApiEnv) -> None:
    client = env.client()
    assert client.get("/api/auth/status").json() == {"users_exist": True, "tls": False}
    r = client.post("/api/auth/login", json={"username": "operator", "password": PASSWORD})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "ainode_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert "path=/" in cookie and "max-age=43200" in cookie and "secure" not in cookie
    csrf = r.json()["csrf_token"]
    me = client.get("/api/auth/me").json()
    assert me["user"]["username"] == "operator" and me["user"]["role"] == "operator"
    assert me["auth"] == "session" and me["csrf_token"] == csrf
    assert client.post("/api/auth/logout").status_code == 403  # CSRF token needed for the cookie
    assert client.post("/api/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert client.get("/api/auth/me").status_code == 401
    [login] = _audit(env, "auth.login")
    assert login.actor == "operator" and login.source == "testclient"
    assert [e.actor for e in _audit(env, "auth.logout")] == ["operator"]


def test_wrong_password_is_401_and_audited_without_the_password(env: ApiEnv) -> None:
    client = env.client()
    r = client.post("/api/auth/login", json={"username": "admin", "password": "not the password"})
    assert r.status_code == 401 and r.json() == {"detail": "wrong user name or password"}
    assert "set-cookie" not in r.headers
    r = client.post("/api/auth/login", json={"username": "nobody", "password": "whatever it is"})
    assert r.status_code == 401 and r.json() == {"detail": "wrong user name or password"}
    failed = _audit(env, "auth.login_failed")
    assert {e.actor for e in failed} == {"admin", "nobody"} and {e.outcome for e in failed} == {"failed"}
    everything = str([(e.target, e.detail) for e in env.ctx.audit.list_events(limit=1000)])
    assert "not the password" not in everything and "whatever it is" not in everything


def test_sign_in_rate_limit_per_user_name(env: ApiEnv) -> None:
    client = env.client()
    for _ in range(3):  # login_max_failures = 3 in make_api
        assert (
            client.post("/api/auth/login", json={"username": "viewer", "password": "x" * 12}).status_code
            == 401
        )
    # Checked before the password: the right one is refused too while locked out.
    r = client.post("/api/auth/login", json={"username": "viewer", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert [e.actor for e in _audit(env, "auth.login_locked")] == ["viewer"]
    # Another user name from the same address is not locked yet (that limit is 3x).
    assert client.post("/api/auth/login", json={"username": "admin", "password": PASSWORD}).status_code == 200
    env.clock.advance(601)  # the window passes
    assert (
        client.post("/api/auth/login", json={"username": "viewer", "password": PASSWORD}).status_code == 200
    )


def test_sign_in_rate_limit_per_source_address(env: ApiEnv) -> None:
    client = env.client()
    for i in range(9):  # 3x the per-name limit, spread over many names
        client.post("/api/auth/login", json={"username": f"guess{i}", "password": "x" * 12})
    r = client.post("/api/auth/login", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 429


def test_session_idle_and_max_age(tmp_path: Path) -> None:
    env = make_api(tmp_path, AuthSettings(idle_s=600, max_age_s=3600))
    client = env.client()
    env.sign_in(client, "viewer")
    env.clock.advance(500)
    assert client.get("/api/auth/me").status_code == 200  # touched: idle time starts again
    env.clock.advance(601)
    assert client.get("/api/auth/me").status_code == 401
    env.sign_in(client, "viewer")
    for _ in range(7):  # active all along, but older than max_age_s at the end
        env.clock.advance(590)
        client.get("/api/auth/me")
    assert client.get("/api/auth/me").status_code == 401


def test_token_auth_needs_no_csrf_and_revoked_token_is_refused(env: ApiEnv, admin: TestClient) -> None:
    r = admin.post("/api/tokens", json={"username": "operator", "name": "script", "expires_days": 30})
    assert r.status_code == 201
    secret, token = r.json()["secret"], r.json()["token"]
    assert (
        secret.startswith("ainode_") and token["token_prefix"] == secret[:14] and token["role"] == "operator"
    )
    assert secret not in str([e.detail for e in env.ctx.audit.list_events(limit=1000)])
    script = env.client(headers={"Authorization": f"Bearer {secret}"})
    assert script.get("/api/auth/me").json()["auth"] == "token"
    job_id = env.ctx.queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": []})
    assert script.post(f"/api/jobs/{job_id}/cancel").status_code == 200  # no X-CSRF-Token needed
    assert (
        script.post("/api/users", json={"username": "x", "role": "viewer", "password": PASSWORD}).status_code
        == 403
    )
    assert [e.actor for e in _audit(env, "job.cancel")] == ["operator"]
    listed = admin.get("/api/tokens").json()
    assert [t["name"] for t in listed] == ["script"] and "secret" not in listed[0]
    assert admin.post(f"/api/tokens/{token['id']}/revoke").json()["revoked_at"] is not None
    assert admin.post(f"/api/tokens/{token['id']}/revoke").status_code == 409
    assert script.get("/api/auth/me").status_code == 401
    assert admin.post("/api/tokens/999/revoke").status_code == 404
    # A token may not act above its user.
    r = admin.post("/api/tokens", json={"username": "viewer", "name": "x", "role": "admin"})
    assert r.status_code == 400
    assert [e.target for e in _audit(env, "token.")] == [f"token/{token['id']}"] * 2


def test_users_create_update(env: ApiEnv, admin: TestClient) -> None:
    r = admin.post("/api/users", json={"username": "dr.who", "role": "viewer", "password": "short"})
    assert r.status_code == 400 and "12 characters" in r.json()["detail"]
    r = admin.post("/api/users", json={"username": "dr.who", "role": "viewer", "password": PASSWORD + "!"})
    assert r.status_code == 201 and r.json()["role"] == "viewer" and "password" not in r.text
    assert (
        admin.post(
            "/api/users", json={"username": "dr.who", "role": "viewer", "password": PASSWORD}
        ).status_code
        == 409
    )
    assert {u["username"] for u in admin.get("/api/users").json()} == {
        "admin",
        "operator",
        "viewer",
        "sender",  # make_api makes one user per role
        "dr.who",
    }
    other = env.client()
    env.sign_in(other, "dr.who", PASSWORD + "!")
    r = admin.patch("/api/users/dr.who", json={"role": "operator", "disabled": True})
    assert r.json()["role"] == "operator" and r.json()["disabled"] is True
    assert other.get("/api/auth/me").status_code == 401  # disabling ends the sessions
    assert admin.patch("/api/users/admin", json={"disabled": True}).status_code == 409
    assert admin.patch("/api/users/ghost", json={"disabled": True}).status_code == 404
    r = admin.patch("/api/users/dr.who", json={"password": "another long password"})
    assert r.status_code == 200
    [update, *_] = _audit(env, "user.update")
    assert update.detail == {"password_changed": True}
    assert "another long password" not in str([e.detail for e in env.ctx.audit.list_events(limit=1000)])


# -- rules -----------------------------------------------------------------------------------------------


def test_rule_create_names_the_field_with_the_problem(env: ApiEnv, admin: TestClient) -> None:
    bad = {**NEW_RULE, "conditions": [{"attribute": "Modalty", "equals": "CT"}]}
    r = admin.post("/api/rules", json={"rule": bad, "comment": "typo"})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["conditions", 0, "attribute"] and "Modalty" in error["msg"]
    unknown = {**NEW_RULE, "action": {"model": "nope", "destinations": ["pacs", "mars"]}}
    locs = [e["loc"] for e in admin.post("/api/rules", json={"rule": unknown}).json()["detail"]]
    assert ["action", "model"] in locs and ["action", "destinations", 1] in locs
    checked = admin.post("/api/rules/validate", json={"rule": bad}).json()
    assert checked["ok"] is False and checked["errors"][0]["loc"] == ["conditions", 0, "attribute"]
    assert admin.post("/api/rules/validate", json={"rule": NEW_RULE}).json() == {"ok": True, "errors": []}
    assert _audit(env, "rule.") == []  # nothing saved, nothing audited


def test_rule_versions_conflict_history_diff_rollback_delete(env: ApiEnv, admin: TestClient) -> None:
    r = admin.post("/api/rules", json={"rule": NEW_RULE, "comment": "first"})
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["created_by"] == "admin"
    assert admin.post("/api/rules", json={"rule": NEW_RULE}).status_code == 409
    changed = {
        **NEW_RULE,
        "description": "every CT, higher priority",
        "action": {**NEW_RULE["action"], "priority": 7},
    }
    r = admin.put("/api/rules/ct-any", json={"rule": changed, "comment": "bump", "expected_version": 1})
    assert r.status_code == 200 and r.json()["version"] == 2
    stale = admin.put("/api/rules/ct-any", json={"rule": NEW_RULE, "comment": "late", "expected_version": 1})
    assert stale.status_code == 409
    moved = admin.put("/api/rules/ct-any", json={"rule": {**NEW_RULE, "id": "other"}, "expected_version": 2})
    assert moved.status_code == 422 and moved.json()["detail"][0]["loc"] == ["id"]
    detail = admin.get("/api/rules/ct-any").json()
    assert detail["rule"]["version"] == 2 and [v["version"] for v in detail["history"]] == [2, 1]
    assert detail["rule"]["rule"]["action"]["priority"] == 7
    diff = admin.get("/api/rules/ct-any/diff", params={"from": 1, "to": 2}).json()
    assert diff["from"] == 1 and diff["to"] == 2
    assert "\n-  priority: 1\n+  priority: 7\n" in diff["diff"]
    assert admin.get("/api/rules/ct-any/diff").json()["diff"] == diff["diff"]  # default: current vs previous
    assert admin.get("/api/rules/ct-any/versions/1").json()["rule"]["action"]["priority"] == 1
    assert admin.get("/api/rules/ct-any/versions/9").status_code == 404
    r = admin.post("/api/rules/ct-any/rollback", json={"version": 1, "comment": "undo"})
    assert r.json()["version"] == 3 and r.json()["rule"]["action"]["priority"] == 1
    assert admin.delete("/api/rules/ct-any", params={"expected_version": 2}).status_code == 409
    r = admin.delete("/api/rules/ct-any", params={"expected_version": 3, "comment": "gone"})
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert "ct-any" not in [x["rule"]["id"] for x in admin.get("/api/rules").json()]
    gone = admin.get("/api/rules/ct-any").json()
    assert gone["rule"] is None and len(gone["history"]) == 4
    assert admin.delete("/api/rules/ct-any").status_code == 404
    assert admin.get("/api/rules/nothing-here").status_code == 404
    audited = {e.action: e for e in _audit(env, "rule.")}
    assert set(audited) == {"rule.create", "rule.update", "rule.rollback", "rule.delete"}
    update = audited["rule.update"]
    assert update.actor == "admin" and update.target == "ct-any" and update.detail["comment"] == "bump"
    assert "+  priority: 7" in update.detail["diff"] and update.detail["version"] == 2
    assert audited["rule.delete"].detail["comment"] == "gone"


def test_dry_run_of_a_draft_and_of_current_rules(admin: TestClient) -> None:
    r = admin.post("/api/rules/dry-run", json={"rule": NEW_RULE, "series_instance_uid": CT_SERIES})
    [match] = r.json()
    assert match["rule_id"] == "ct-any" and match["matched"] is True
    assert match["conditions"] == [{"condition": "Modality == 'CT'", "value": "CT", "matched": True}]
    current = admin.post("/api/rules/dry-run", json={"series_instance_uid": CT_SERIES}).json()
    assert {m["rule_id"]: m["matched"] for m in current} == {
        "ct-chest-lungs": True,
        "mr-brain-extraction": False,
    }
    typed = admin.post(
        "/api/rules/dry-run", json={"attributes": {"Modality": "MR", "NumberOfInstances": 100}}
    )
    assert {m["rule_id"]: m["matched"] for m in typed.json()}["mr-brain-extraction"] is True
    assert admin.post("/api/rules/dry-run", json={}).status_code == 422
    assert admin.post("/api/rules/dry-run", json={"series_instance_uid": "9.9"}).status_code == 404
    bad = admin.post("/api/rules/dry-run", json={"rule": {"id": "x"}, "attributes": {}})
    assert bad.status_code == 422 and ["conditions"] in [e["loc"] for e in bad.json()["detail"]]


def test_replay_over_stored_series_names_other_matching_rules(admin: TestClient) -> None:
    r = admin.post("/api/rules/replay", json={"rule": NEW_RULE, "limit": 10}).json()
    assert r["series_checked"] == 1 and r["matched"] == 1
    [item] = r["items"]
    assert (
        item["series_instance_uid"] == CT_SERIES and item["modality"] == "CT" and item["instance_count"] == 30
    )
    assert item["other_rules"] == ["ct-chest-lungs"]
    mr_only = {**NEW_RULE, "conditions": [{"attribute": "Modality", "equals": "MR"}]}
    assert admin.post("/api/rules/replay", json={"rule": mr_only}).json()["matched"] == 0


def test_export_and_import(env: ApiEnv, admin: TestClient) -> None:
    r = admin.get("/api/rules/export")
    assert r.headers["content-type"].startswith("application/yaml")
    data = yaml.safe_load(r.text)
    assert {x["id"] for x in data["rules"]} == {"ct-chest-lungs", "mr-brain-extraction"}
    data["rules"][0]["action"]["priority"] = 42
    r = admin.post("/api/rules/import", json={"yaml": yaml.safe_dump(data), "comment": "bulk"})
    assert r.status_code == 200
    [saved] = r.json()  # only the changed rule gets a version
    assert saved["rule_id"] == data["rules"][0]["id"] and saved["rule"]["action"]["priority"] == 42
    [event] = _audit(env, "rule.import")
    assert event.detail["comment"] == "bulk" and "priority: 42" in event.detail["diffs"][saved["rule_id"]]
    data["rules"][1]["conditions"][0]["attribute"] = "Nope"
    bad = admin.post("/api/rules/import", json={"yaml": yaml.safe_dump(data)})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
        "rules",
        1,
        "conditions",
        0,
        "attribute",
    ]
    assert admin.post("/api/rules/import", json={"yaml": "rules: [unclosed"}).json()["detail"][0]["loc"] == [
        "yaml"
    ]
    assert admin.post("/api/rules/import", json={"yaml": "", "replace": True}).status_code == 422
    r = admin.post("/api/rules/import", json={"yaml": "rules: []", "replace": True, "comment": "wipe"})
    assert all(v["deleted"] for v in r.json()) and len(r.json()) == 2
    assert admin.get("/api/rules").json() == []


# -- jobs, series ----------------------------------------------------------------------------------------


def _infer_and_deliver(queue: JobQueue) -> tuple[int, int]:
    """An infer job that succeeded and enqueued one deliver job (as the worker does)."""
    infer_id = queue.enqueue(
        JobKind.INFER,
        {
            "series_instance_uid": CT_SERIES,
            "study_instance_uid": "1.2.826.0.1.3680043.8.498.99",
            "rule_id": "ct-chest-lungs",
            "rule_version": 2,
            "model": "ct-lung",
            "destinations": ["pacs"],
            "generation": 1,
        },
    )
    job = queue.claim("w1", [JobKind.INFER], 60)
    assert job is not None and job.id == infer_id
    deliver_id = queue.enqueue(
        JobKind.DELIVER,
        {
            "destination": "pacs",
            "files": ["results/a.dcm"],
            "series_instance_uid": CT_SERIES,
            "infer_job_id": infer_id,
        },
    )
    queue.succeed(
        infer_id,
        "w1",
        {"model": "ct-lung", "device": "cpu", "timings": {"load_s": 1.0, "infer_s": 2.0, "encode_s": 0.5}},
    )
    return infer_id, deliver_id


def test_jobs_filters_detail_and_timeline(env: ApiEnv, admin: TestClient) -> None:
    queue = env.ctx.queue
    infer_id, deliver_id = _infer_and_deliver(queue)
    other = queue.enqueue(
        JobKind.INFER,
        {
            "series_instance_uid": "9.8.7",
            "study_instance_uid": "9.8",
            "rule_id": "mr-brain-extraction",
            "rule_version": 1,
            "model": "mr-brain",
            "destinations": ["pacs"],
        },
    )
    page = admin.get("/api/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [other, deliver_id]
    assert [j["id"] for j in admin.get("/api/jobs", params={"offset": 2}).json()["items"]] == [infer_id]

    def by(**q: str) -> list[int]:
        return [j["id"] for j in admin.get("/api/jobs", params=q).json()["items"]]

    assert by(kind="deliver") == [deliver_id]
    assert by(status="succeeded") == [infer_id]
    assert by(rule_id="mr-brain-extraction") == [other]
    assert by(model="ct-lung") == [infer_id]
    assert by(destination="pacs") == [deliver_id]
    assert by(series_instance_uid=CT_SERIES) == [deliver_id, infer_id]
    assert by(modality="CT") == [deliver_id, infer_id]
    assert by(since="2030-01-01T00:00:00Z") == []
    assert by(until="2030-01-01T00:00:00") == [other, deliver_id, infer_id]
    assert admin.get("/api/jobs", params={"status": "bogus"}).status_code == 422
    assert admin.get("/api/jobs", params={"limit": 501}).status_code == 422

    detail = admin.get(f"/api/jobs/{infer_id}").json()
    assert detail["model"] == "ct-lung" and detail["rule_id"] == "ct-chest-lungs"
    assert [j["id"] for j in detail["related"]] == [deliver_id]
    steps = {s["stage"]: s for s in detail["timeline"]}
    assert list(steps) == ["received", "complete", "routed", "inferred", "encoded", "delivered", "verified"]
    assert steps["received"]["status"] == "done" and steps["received"]["detail"]["instances"] == 30
    assert steps["inferred"]["status"] == "done" and steps["inferred"]["duration_s"] == 3.0
    assert steps["encoded"]["duration_s"] == 0.5
    assert steps["delivered"]["status"] == "pending" and steps["delivered"]["detail"]["destination"] == "pacs"
    child = admin.get(f"/api/jobs/{deliver_id}").json()
    assert [j["id"] for j in child["related"]] == [infer_id] and "spool_path" not in str(child)
    assert admin.get("/api/jobs/9999").status_code == 404


def test_timeline_of_dead_and_verified_deliveries(env: ApiEnv, admin: TestClient) -> None:
    queue = env.ctx.queue
    infer_id, deliver_id = _infer_and_deliver(queue)
    second = queue.enqueue(
        JobKind.DELIVER,
        {"destination": "archive", "files": [], "series_instance_uid": CT_SERIES, "infer_job_id": infer_id},
    )
    first = queue.claim("w", [JobKind.DELIVER], 60)
    assert first is not None and first.id == deliver_id
    queue.fail(deliver_id, "w", "PermanentDeliveryError: association rejected", permanent=True)
    other = queue.claim("w", [JobKind.DELIVER], 60)
    assert other is not None and other.id == second
    env.clock.advance(2)
    queue.succeed(second, "w", {"destination": "archive", "verified": True})
    steps = admin.get(f"/api/jobs/{second}").json()["timeline"]
    delivered = [(s["status"], s["detail"]["destination"]) for s in steps if s["stage"] == "delivered"]
    verified = [(s["status"], s["detail"]["destination"]) for s in steps if s["stage"] == "verified"]
    assert delivered == [("failed", "pacs"), ("done", "archive")]
    assert verified == [("skipped", "pacs"), ("done", "archive")]
    dead = next(s for s in steps if s["stage"] == "delivered" and s["status"] == "failed")
    assert "association rejected" in dead["detail"]["error"] and dead["detail"]["attempts"] == 1
    assert next(s for s in steps if s["stage"] == "delivered" and s["status"] == "done")["duration_s"] == 2.0


def test_retry_rerun_cancel_and_dead_letter_replay(env: ApiEnv, admin: TestClient) -> None:
    queue = env.ctx.queue
    infer_id, deliver_id = _infer_and_deliver(queue)
    assert admin.post(f"/api/jobs/{deliver_id}/retry").status_code == 409  # queued
    assert admin.post(f"/api/jobs/{infer_id}/cancel").status_code == 409  # succeeded
    job = queue.claim("w2", [JobKind.DELIVER], 60)
    assert job is not None
    queue.fail(job.id, "w2", "PermanentDeliveryError: association rejected", permanent=True)
    dead = admin.get("/api/jobs", params={"status": "dead"}).json()["items"]
    assert [j["id"] for j in dead] == [deliver_id] and "rejected" in dead[0]["last_error"]
    r = admin.post("/api/dead-letter/replay", json={"job_ids": [deliver_id, infer_id, 4242]})
    assert r.json() == {"replayed": [deliver_id], "skipped": [infer_id, 4242]}
    assert admin.get(f"/api/jobs/{deliver_id}").json()["status"] == "queued"
    cancelled = admin.post(f"/api/jobs/{deliver_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == JobStatus.CANCELLED
    rerun = admin.post(f"/api/jobs/{infer_id}/rerun").json()
    assert (
        rerun["id"] not in (infer_id, deliver_id) and rerun["status"] == "queued" and rerun["kind"] == "infer"
    )
    assert admin.post(f"/api/jobs/{deliver_id}/retry").status_code == 409  # cancelled: re-run it instead
    running = queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": []})
    assert queue.claim("w3", [JobKind.DELIVER], 60) is not None
    assert admin.post(f"/api/jobs/{running}/rerun").status_code == 409  # not finished
    assert admin.post("/api/jobs/9999/retry").status_code == 404
    actions = [
        (e.action, e.target)
        for e in env.ctx.audit.list_events(limit=100)
        if e.action.startswith(("job.", "dead"))
    ]
    assert actions == [
        ("job.rerun", f"job/{infer_id}"),
        ("job.cancel", f"job/{deliver_id}"),
        ("deadletter.replay", "1 jobs"),
    ]


def test_series_list_and_detail(env: ApiEnv, admin: TestClient) -> None:
    page = admin.get("/api/series").json()
    assert page["total"] == 1 and page["items"][0]["instance_count"] == 30
    assert admin.get("/api/series", params={"modality": "MR"}).json() == {"items": [], "total": 0}
    _infer_and_deliver(env.ctx.queue)
    detail = admin.get(f"/api/series/{CT_SERIES}").json()
    assert len(detail["jobs"]) == 2 and detail["results"] == []
    assert admin.get("/api/series/9.9.9").status_code == 404
    for key in ("PatientName", "PatientID", "PatientBirthDate", "patient", "header"):
        assert key not in admin.get("/api/series").text


# -- destinations, models, audit, system ------------------------------------------------------------------


def test_destinations_list_and_probe(env: ApiEnv, admin: TestClient) -> None:
    _, deliver_id = _infer_and_deliver(env.ctx.queue)
    dests = {d["name"]: d for d in admin.get("/api/destinations").json()}
    assert dests["pacs"]["counts"] == {"succeeded": 0, "dead": 0, "failed": 0, "queued": 1}
    assert dests["pacs"]["recent"][0]["job_id"] == deliver_id and dests["archive"]["recent"] == []
    assert admin.post("/api/destinations/pacs/test").json() == {
        "ok": True,
        "detail": "C-ECHO Success",
        "elapsed_s": 0.01,
    }
    assert admin.post("/api/destinations/archive/test").json()["ok"] is False
    assert admin.post("/api/destinations/nowhere/test").status_code == 404
    assert env.probes == ["pacs", "archive"]
    assert [(e.target, e.outcome) for e in _audit(env, "destination.test")] == [
        ("archive", "failed"),
        ("pacs", "ok"),
    ]


def test_models_list(admin: TestClient) -> None:
    models = {m["name"]: m for m in admin.get("/api/models").json()}
    assert set(models) == {"ct-lung", "mr-brain", "ct-lung-classical"}
    assert models["ct-lung"]["weights"][0]["verified"] is True and models["ct-lung"]["modalities"] == ["CT"]


def test_audit_list_and_export(env: ApiEnv, admin: TestClient) -> None:
    env.client().post("/api/auth/login", json={"username": "=cmd|' /C calc'!A0", "password": "x" * 12})
    events = admin.get("/api/audit").json()
    assert events[0]["action"] == "auth.login_failed" and events[1]["action"] == "auth.login"
    failed = admin.get("/api/audit", params={"action": "auth.login_failed"}).json()
    assert [e["action"] for e in failed] == ["auth.login_failed"]
    assert {e["action"] for e in admin.get("/api/audit", params={"action": "auth."}).json()} == {
        "auth.login",
        "auth.login_failed",
    }
    assert admin.get("/api/audit", params={"actor": "admin", "limit": 1}).json()[0]["actor"] == "admin"
    r = admin.get("/api/audit/export", params={"format": "csv"})
    assert (
        r.headers["content-type"].startswith("text/csv") and "attachment" in r.headers["content-disposition"]
    )
    rows = list(csv.DictReader(io.StringIO(r.text)))
    failed = next(row for row in rows if row["action"] == "auth.login_failed")
    assert failed["actor"].startswith("'=")  # no formula injection into spreadsheets
    as_json = admin.get("/api/audit/export", params={"format": "json"}).json()
    assert {e["action"] for e in as_json} >= {"auth.login", "auth.login_failed", "audit.export"}
    assert _audit(env, "audit.export")[0].detail["format"] == "json"


def test_health_ready_metrics_and_page(env: ApiEnv) -> None:
    client = env.client()
    assert client.get("/healthz").json() == {"status": "ok", "version": "test"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["spool"] == {
        "ok": True,
        "detail": "12 GB free",
    }
    env.ctx.metrics = NodeMetrics()
    assert client.get("/metrics").status_code == 401  # "testclient" is not an allowed network
    local = env.client(client=("127.0.0.1", 40000))
    r = local.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    env.sign_in(client, "viewer")
    assert client.get("/metrics").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404

    def not_ready() -> dict[str, Any]:
        from dicom_ai_node.domain.catalog import CheckResult

        return {"database": CheckResult(True, "ok"), "inference": CheckResult(False, "process down")}

    env.ctx.readiness = not_ready
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not ready"


def test_openapi_for_signed_in_users_only(env: ApiEnv) -> None:
    client = env.client()
    assert client.get("/openapi.json").status_code == 401
    env.sign_in(client, "viewer")
    assert "/api/rules/{rule_id}" in client.get("/openapi.json").json()["paths"]
