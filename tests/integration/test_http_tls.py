"""The admin page over HTTPS (http.tls_cert + tls_key) and the warning for plain HTTP off loopback."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from pathlib import Path

import pytest

from dicom_ai_node.config import HttpSettings
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.node_admin import insecure_http_warning
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.db import make_engine

PASSWORD = "a long enough password"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_plain_http_off_loopback_is_warned_about() -> None:
    assert insecure_http_warning(HttpSettings(bind="127.0.0.1")) is None
    assert insecure_http_warning(HttpSettings(bind="::1")) is None
    warning = insecure_http_warning(HttpSettings(bind="0.0.0.0"))
    assert warning is not None and "without TLS" in warning and "http.tls_cert" in warning
    tls = HttpSettings(bind="0.0.0.0", tls_cert=Path("c.pem"), tls_key=Path("k.pem"))
    assert insecure_http_warning(tls) is None
    with pytest.raises(ValueError, match="together"):
        HttpSettings(tls_cert=Path("c.pem"))


def test_https_serves_the_api_and_sets_a_secure_cookie(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    node = NodeProcess(
        tmp_path / "node",
        pacs_aet="ORTHANC",
        pacs_port=free_port(),
        http_port=port,
        extra={"http": {"bind": "127.0.0.1", "port": port, "tls_cert": str(cert), "tls_key": str(key)}},
    )
    with node:
        assert node.http_url.startswith("https://")
        assert node.get_json("/healthz")["status"] == "ok"
        assert "https://127.0.0.1" in node.log_tail()

        engine = make_engine(node.database_url)
        AccountRepository(engine).create_user("tls-admin", Role.ADMIN, PASSWORD)
        engine.dispose()
        conn = http.client.HTTPSConnection(
            "127.0.0.1", node.http_port, context=ssl.create_default_context(cafile=str(cert)), timeout=10
        )
        body = json.dumps({"username": "tls-admin", "password": PASSWORD})
        conn.request("POST", "/api/auth/login", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        cookie = resp.getheader("Set-Cookie") or ""
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"secure", "httponly", "samesite"} <= attributes, cookie
        assert "samesite=strict" in cookie.lower()
        conn.close()

        # Plain HTTP on the HTTPS port gets no answer from the API.
        plain = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/healthz")
            answer = plain.getresponse()
            assert answer.status == 400  # uvicorn's h11 may answer a bare 400; never the API
            raise http.client.BadStatusLine("plain HTTP refused with 400")
        plain.close()
