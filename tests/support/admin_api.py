"""An admin API on a real SQLite database for tests: users, a series, seeded rules, fake probes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dicom_ai_node.api.app import create_app
from dicom_ai_node.api.context import AdminContext
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.domain.catalog import (
    AuthSettings,
    CheckResult,
    DestinationInfo,
    ModelInfo,
    ProbeResult,
    WeightsInfo,
)
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.persistence.rules_store import RuleStore
from dicom_ai_node.rules_file import load_rules

RULES_FILE = Path(__file__).parents[2] / "config" / "rules.yaml"
PASSWORD = "correct horse battery"  # >= MIN_PASSWORD_LENGTH
CT_SERIES = "1.2.3.4"


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def cheap_hasher() -> PasswordHasher:
    """argon2id with tiny parameters: same code path, milliseconds instead of a second per hash."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclass
class ApiEnv:
    app: FastAPI
    ctx: AdminContext
    clock: FakeClock
    probes: list[str] = field(default_factory=list)

    def client(self, **kwargs: Any) -> TestClient:
        return TestClient(self.app, **kwargs)

    def sign_in(self, client: TestClient, username: str, password: str = PASSWORD) -> str:
        """Signs the client in (cookie) and returns the session's CSRF token."""
        r = client.post("/api/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["csrf_token"])

    def token(self, username: str, role: Role | None = None) -> dict[str, str]:
        secret, _ = self.ctx.accounts.create_token(username, f"test-{username}", role)
        return {"Authorization": f"Bearer {secret}"}


def _models() -> list[ModelInfo]:
    return [
        ModelInfo(
            name=name,
            version="1.0.0",
            task="segmentation",
            format="builtin",
            modalities=[modality],
            licence="Apache-2.0",
            weights=[WeightsInfo("model.pt", "ab" * 32, True)],
        )
        for name, modality in (("ct-lung", "CT"), ("mr-brain", "MR"), ("ct-lung-classical", "CT"))
    ]


def _record_ct_series(repo: SeriesRepository, when: datetime, uid: str = CT_SERIES, count: int = 30) -> None:
    for i in range(count):
        repo.record_instance(
            InstanceRecord(
                sop_instance_uid=f"{uid}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=uid,
                study_instance_uid="1.2.3",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=f"instances/x/{uid}-{i}.dcm",
                size_bytes=1,
                calling_ae="ORTHANC",
                modality="CT",
                body_part_examined="CHEST",
                series_description="CHEST CT",
                header={"Modality": "CT", "SliceThickness": 1.0},
            ),
            now=when + timedelta(seconds=i / 10),
        )


TEST_HOST = "testserver"


def _with_test_host(auth: AuthSettings) -> AuthSettings:
    return replace(auth, allowed_hosts=(*auth.allowed_hosts, TEST_HOST))


def make_api(tmp_path: Path, auth: AuthSettings | None = None) -> ApiEnv:
    """Users admin/operator/viewer (password PASSWORD), one CT series, rules seeded from config/rules.yaml."""
    clock = FakeClock()
    engine = make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    create_schema(engine)
    repo = SeriesRepository(engine, clock=clock)
    accounts = AccountRepository(engine, clock=clock, hasher=cheap_hasher())
    rules = RuleStore(engine, clock=clock)
    rules.seed(load_rules(RULES_FILE), actor="cli:test")
    for role in Role:
        accounts.create_user(role.value, role, PASSWORD)
    _record_ct_series(repo, clock.now - timedelta(minutes=5))
    probes: list[str] = []

    def probe(name: str) -> ProbeResult:
        probes.append(name)
        return ProbeResult(
            ok=name == "pacs", detail="C-ECHO Success" if name == "pacs" else "refused", elapsed_s=0.01
        )

    ctx = AdminContext(
        repo=repo,
        queue=JobQueue(engine, clock=clock),
        rules=rules,
        accounts=accounts,
        audit=AuditLog(engine, clock=clock),
        destinations=[
            DestinationInfo("pacs", "dicom", "ORTHANC@127.0.0.1:4242", {"verify": True}),
            DestinationInfo("archive", "dicomweb", "http://127.0.0.1:8042/dicom-web", {}),
        ],
        probe_destination=probe,
        models=_models,
        readiness=lambda: {"database": CheckResult(True, "ok"), "spool": CheckResult(True, "12 GB free")},
        metrics=None,
        # TestClient and schemathesis send "Host: testserver": allowed here on top of the test's own hosts.
        auth=_with_test_host(auth or AuthSettings(login_max_failures=3, login_window_s=600)),
        version="test",
        ae_title="AINODE",
        dicom_port=11112,
        clock=clock,
    )
    return ApiEnv(create_app(ctx), ctx, clock, probes)
