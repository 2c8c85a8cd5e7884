"""Cross-site attacks on the admin API: a form post from another site riding the session cookie, and DNS
rebinding (a foreign Host header). In-process (TestClient) and against the real node (uvicorn)."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from dicom_ai_node.api.security import host_allowed, host_name
from dicom_ai_node.config import HttpSettings, load_settings
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.domain.catalog import AuthSettings
from dicom_ai_node.errors import ConfigError
from tests.support.admin_api import ApiEnv, make_api

EVIL = "evil.example"


@pytest.fixture
def env(tmp_path: Path) -> ApiEnv:
    return make_api(tmp_path)


def test_cross_site_form_post_with_the_session_cookie_is_refused(env: ApiEnv) -> None:
    client = env.client()
    env.sign_in(client, "admin")  # the victim's browser holds the session cookie
    before = env.ctx.queue.count_jobs()
    form = {"job_ids": "1"}
    plain = client.post("/api/jobs/1/rerun", data=form)
    from_evil = client.post(
        "/api/dead-letter/replay",
        data=form,
        headers={"Origin": f"http://{EVIL}", "Referer": f"http://{EVIL}/"},
    )
    for r in (plain, from_evil):
        assert r.status_code == 403 and r.json() == {"detail": "CSRF token missing or wrong"}
    assert env.ctx.queue.count_jobs() == before  # nothing re-run or replayed
    assert len(env.ctx.audit.list_events(action="auth.csrf_failed")) == 2


def test_a_foreign_host_header_is_refused_dns_rebinding(env: ApiEnv) -> None:
    client = env.client()
    csrf = env.sign_in(client, "admin")
    rebound = {"Host": f"{EVIL}:8080"}
    for method, path in [
        ("GET", "/"),
        ("GET", "/api/jobs"),
        ("GET", "/metrics"),
        ("POST", "/api/auth/logout"),
    ]:
        r = client.request(method, path, headers={**rebound, "X-CSRF-Token": csrf})
        assert r.status_code == 400 and r.json() == {"detail": "host not allowed"}, (method, path)
        assert r.headers["x-frame-options"] == "DENY"  # the refusal carries the security headers
    # A login through the rebound name is refused before any password is checked.
    login = env.client().post("/api/auth/login", json={"username": "admin", "password": "x"}, headers=rebound)
    assert login.status_code == 400
    assert env.ctx.audit.list_events(action="auth.login_failed") == []
    # Orchestrators probe by IP: the probes answer any Host.
    assert client.get("/healthz", headers=rebound).status_code == 200
    assert client.get("/readyz", headers=rebound).status_code == 200
    # The session still works through an allowed name.
    assert client.get("/api/jobs").status_code == 200


def test_host_header_parsing_and_defaults() -> None:
    assert AuthSettings().allowed_hosts == ("127.0.0.1", "localhost", "::1")
    allowed = AuthSettings().allowed_hosts
    for header in ("127.0.0.1:8080", "localhost", "LOCALHOST:80", "[::1]:8080", "localhost."):
        assert host_allowed(host_name(header), allowed), header
    for header in (EVIL, f"{EVIL}:80", "", "127.0.0.1.evil.example", "[::2]:80", "localhost:80:80"):
        assert not host_allowed(host_name(header), allowed), header
    assert host_allowed("pacs-ai.example.org", ("*.example.org",))
    assert not host_allowed("example.org.evil", ("*.example.org",))
    assert host_allowed(EVIL, ("*",))


def test_allowed_hosts_config(tmp_path: Path) -> None:
    assert HttpSettings().effective_allowed_hosts() == ("127.0.0.1", "localhost", "::1")
    assert HttpSettings(bind="10.1.2.3").effective_allowed_hosts()[-1] == "10.1.2.3"
    assert HttpSettings(bind="0.0.0.0").effective_allowed_hosts() == ("127.0.0.1", "localhost", "::1")
    named = HttpSettings(bind="0.0.0.0", allowed_hosts=["AINode.Example.org"])
    assert named.effective_allowed_hosts() == ("ainode.example.org",)
    cfg = tmp_path / "node.yaml"
    cfg.write_text("http:\n  allowed_hosts: ['https://ainode.example.org']\n")
    with pytest.raises(ConfigError, match="http.allowed_hosts"):
        load_settings(cfg)


def test_the_real_server_refuses_a_rebound_host(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", pacs_aet="ORTHANC", pacs_port=free_port(), http_port=free_port())
    with node:
        assert node.get_json("/healthz")["status"] == "ok"
        assert node.get_json("/api/auth/me")["auth"] == "token"  # NodeProcess talks to 127.0.0.1
        conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        conn.request("GET", "/api/auth/status", headers={"Host": f"{EVIL}:{node.http_port}"})
        resp = conn.getresponse()
        assert resp.status == 400 and b"host not allowed" in resp.read()
        conn.request("GET", "/api/auth/status", headers={"Host": f"localhost:{node.http_port}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.close()
