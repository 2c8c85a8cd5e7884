"""Run the real node (`dicom-ai-node serve`) as a subprocess with its own config, spool and database.

The node accepts C-STORE from the given PACS and from STORESCU, sends its results to the PACS as
destination `pacs`, and routes with the checkout's config/rules.yaml. Its own API calls (`jobs`,
`get_json`) sign in with a token of an account the runner creates in the node's database.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.repo import ROOT, checkout_file
from dicom_ai_node.domain.auth import Role

# The account the tests' own API calls use (a random password nobody needs: they use a token).
TEST_ADMIN = "test-admin"


class NodeProcess:
    """`dicom-ai-node serve` in a subprocess on free loopback ports; `start()` waits for /healthz."""

    def __init__(
        self,
        workdir: Path,
        *,
        pacs_aet: str,
        pacs_port: int,
        dicom_port: int | None = None,
        http_port: int | None = None,
        ae_title: str = "AINODE",
        database_url: str | None = None,
        quiet_period_s: float = 2,
        extra: dict[str, Any] | None = None,
        serve_args: tuple[str, ...] = (),
        pacs_verify: bool = True,
        api_account: bool = True,
        api_user: str = TEST_ADMIN,
        api_role: Role = Role.ADMIN,
        pacs_complete_on_release: bool = False,
        launcher: tuple[str, ...] = (),
    ) -> None:
        """`api_account=False` leaves the node without any user (as a fresh install is): the caller's own
        requests then go without a token, and only the open routes answer them. Otherwise `start()`
        creates user `api_user` with `api_role` (random password) and a token for those requests.
        `launcher`: a command that runs the node as its child (e.g. `strace ... --`); `proc` is then the
        launcher's process."""
        self.serve_args = serve_args
        self.launcher = launcher
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.log_path = self.workdir / "node.log"
        self.config_path = self.workdir / "node.yaml"
        config: dict[str, Any] = {
            "ae_title": ae_title,
            "dicom": {
                "bind": "127.0.0.1",
                "port": self.dicom_port,
                "allowed_peers": [
                    # pacs_complete_on_release: the PACS's release of an association completes its series
                    # (Orthanc forwards each stable series in one association).
                    {
                        "ae_title": pacs_aet,
                        "hosts": ["127.0.0.1"],
                        "series_complete_on_release": pacs_complete_on_release,
                    },
                    {"ae_title": "STORESCU"},
                ],
            },
            "http": {"bind": "127.0.0.1", "port": self.http_port},
            "spool_dir": str(self.workdir / "spool"),
            "database_url": database_url or f"sqlite:///{self.workdir / 'node.db'}",
            "disk_reserve_mb": 100,
            "quiet_period_s": quiet_period_s,
            "sweep_interval_s": 0.5,
            "rules_file": str(checkout_file("config/rules.yaml")),
            "destinations": [
                {
                    "name": "pacs",
                    "type": "dicom",
                    "ae_title": pacs_aet,
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    # A bare storescp has no C-FIND: tests that use one turn the read-back off.
                    "verify": pacs_verify,
                }
            ],
            "worker": {
                "lease_s": 60,
                "heartbeat_s": 5,
                "poll_interval_s": 0.2,
                "backoff_base_s": 1,
                "backoff_cap_s": 10,
            },
        }
        config.update(extra or {})
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.database_url = str(config["database_url"])
        tls_cert = config["http"].get("tls_cert")
        # HTTPS when the config gives a certificate; the tests trust exactly that certificate.
        self._ssl = ssl.create_default_context(cafile=str(tls_cert)) if tls_cert else None
        self._api_token: str | None = None
        self._api_account = api_account
        self._api_user = api_user
        self._api_role = api_role

    @property
    def http_url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60) -> NodeProcess:
        """Start the node; RuntimeError (with the log tail) when it exits, TimeoutError when it hangs."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The child keeps its own copy of the log's file descriptor; ours closes with the block.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.launcher,
                    sys.executable,
                    "-m",
                    "dicom_ai_node.cli",
                    "serve",
                    "-c",
                    str(self.config_path),
                    *self.serve_args,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/healthz")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
                continue
            if self._api_account:
                self._api_token = self._api_token or self._create_api_token()
            return self
        self.stop()  # never leave a half-started node behind
        raise TimeoutError(f"node did not answer /healthz in {timeout_s} s:\n{self.log_tail()}")

    def _create_api_token(self) -> str:
        """An API token for the caller's own requests (the admin API needs sign-in)."""
        from dicom_ai_node.persistence.accounts import AccountRepository
        from dicom_ai_node.persistence.db import make_engine

        engine = make_engine(self.database_url)
        try:
            accounts = AccountRepository(engine)
            if accounts.get_user(self._api_user) is None:
                accounts.create_user(self._api_user, self._api_role, secrets.token_urlsafe(24))
            secret, _ = accounts.create_token(self._api_user, "devtools")
        finally:
            engine.dispose()
        return secret

    def _request(self, path: str, body: Any = None, method: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self._api_token}"} if self._api_token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.http_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=10, context=self._ssl) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get_json(self, path: str) -> Any:
        return self._request(path)

    def post_json(self, path: str, body: Any = None) -> Any:
        return self._request(path, body if body is not None else {}, method="POST")

    def jobs(self, limit: int = 100, **filters: str) -> list[dict[str, Any]]:
        """Jobs, newest first (the first page of GET /api/jobs)."""
        query = urllib.parse.urlencode({"limit": limit, **filters})
        return list(self.get_json(f"/api/jobs?{query}")["items"])

    @property
    def running(self) -> bool:
        """Whether the node process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
