"""Request and response bodies of the admin API: Create/Update inputs and Public outputs.

Public models are built from the persistence rows with `from_attributes`, listing only what an admin may
see: never password hashes, token hashes, spool paths or anything patient-identifying.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from dicom_ai_node.domain.auth import Role
from dicom_ai_node.domain.jobs import JobKind, JobStatus

# Row ids are 32-bit integers on PostgreSQL; larger numbers can name nothing.
INT32_MAX = 2_147_483_647
DbId = Annotated[int, Field(ge=1, le=INT32_MAX)]
# Free text stored in the database: bounded, and without NUL (PostgreSQL text refuses it).
Comment = Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00]*$")]
Username = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
Password = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Uid = Annotated[str, StringConstraints(pattern=r"^[0-9.]{1,64}$")]


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def json_safe(value: Any) -> Any:
    """Header values as JSON can carry them (NaN and infinities become text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return value


# -- auth, users, tokens ---------------------------------------------------------------------------------


class UserPublic(_Public):
    username: str
    role: Role
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None


class LoginRequest(BaseModel):
    username: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00]*$")]
    password: Password


class NodePublic(BaseModel):
    """Which node this is (shown in the page header); only for signed-in users."""

    version: str
    ae_title: str
    dicom_port: int


class LoginResponse(BaseModel):
    user: UserPublic
    csrf_token: str
    node: NodePublic


class MeResponse(BaseModel):
    user: UserPublic
    csrf_token: str | None
    auth: Literal["session", "token"]
    node: NodePublic


class AuthStatus(BaseModel):
    users_exist: bool
    tls: bool


class UserCreate(BaseModel):
    username: Username
    role: Role
    password: Password


class UserUpdate(BaseModel):
    role: Role | None = None
    disabled: bool | None = None
    password: Password | None = None


class TokenPublic(_Public):
    id: int
    name: str
    username: str
    role: Role
    token_prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreate(BaseModel):
    username: Username
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00]*$")]
    role: Role | None = None
    expires_days: Annotated[int, Field(ge=1, le=3650)] | None = None


class TokenCreated(BaseModel):
    token: TokenPublic
    secret: str  # shown once; only its sha256 is stored


# -- system ----------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class CheckPublic(_Public):
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, CheckPublic]


# -- jobs and series -------------------------------------------------------------------------------------


class JobPublic(_Public):
    id: int
    kind: JobKind
    status: JobStatus
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    series_instance_uid: str | None
    rule_id: str | None
    model: str | None
    destination: str | None
    worker_id: str | None
    last_error: str | None
    # What the job was asked to do and what it reported (UIDs, model, destination, timings, verified);
    # never patient data: payloads and results hold none.
    payload: dict[str, Any]
    result: dict[str, Any] | None


class JobPage(BaseModel):
    items: list[JobPublic]
    total: int


class ResultPublic(_Public):
    id: int
    job_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    source_series_instance_uid: str
    created_at: datetime


class TimelineStepPublic(_Public):
    stage: str
    status: Literal["done", "running", "pending", "failed", "skipped"]
    at: datetime | None
    duration_s: float | None
    detail: dict[str, Any]


class JobDetail(JobPublic):
    results: list[ResultPublic]
    timeline: list[TimelineStepPublic]
    related: list[JobPublic]  # an infer job's deliver jobs, or a deliver job's infer job


class DeadLetterReplay(BaseModel):
    job_ids: Annotated[list[DbId], Field(min_length=1, max_length=500)]


class DeadLetterReplayed(BaseModel):
    replayed: list[int]
    skipped: list[int]


class SeriesPublic(_Public):
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    sop_class_uid: str
    calling_ae: str
    instance_count: int
    status: str
    generation: int
    first_received_at: datetime
    last_received_at: datetime
    routing_started_at: datetime | None
    routed_at: datetime | None
    route_note: str


class SeriesPage(BaseModel):
    items: list[SeriesPublic]
    total: int


class SeriesDetail(SeriesPublic):
    results: list[ResultPublic]
    jobs: list[JobPublic]


# -- rules -----------------------------------------------------------------------------------------------


class RulePublic(BaseModel):
    rule: dict[str, Any]  # domain.rules.Rule as JSON (by alias: a condition's `in`)
    version: int
    updated_at: datetime
    updated_by: str
    comment: str


class RuleVersionPublic(BaseModel):
    rule_id: str
    version: int
    change: str
    comment: str
    created_by: str
    created_at: datetime
    deleted: bool
    rule: dict[str, Any]


class RuleDetail(BaseModel):
    rule: RulePublic | None  # None once deleted: the history stays and can be rolled back
    history: list[RuleVersionPublic]


class RuleCreate(BaseModel):
    rule: dict[str, Any]
    comment: Comment = ""


class RuleUpdate(BaseModel):
    rule: dict[str, Any]
    comment: Comment = ""
    expected_version: DbId


class RuleRollback(BaseModel):
    version: DbId
    comment: Comment = ""


class RuleImport(BaseModel):
    yaml: Annotated[str, StringConstraints(max_length=1_000_000)]
    comment: Comment = ""
    replace: bool = False


class FieldErrorPublic(BaseModel):
    loc: list[str | int]
    msg: str


class RuleValidate(BaseModel):
    rule: Any = None


class RuleValidation(BaseModel):
    ok: bool
    errors: list[FieldErrorPublic]


class DryRunRequest(BaseModel):
    rule: dict[str, Any] | None = None  # a draft; without it every current rule is tried
    series_instance_uid: Uid | None = None
    attributes: dict[str, Any] | None = None


class ConditionPublic(BaseModel):
    condition: str
    value: Any
    matched: bool


class MatchPublic(BaseModel):
    rule_id: str
    rule_version: int
    matched: bool
    model: str
    destinations: list[str]
    conditions: list[ConditionPublic]


class RuleReplayRequest(BaseModel):
    rule: dict[str, Any]
    limit: Annotated[int, Field(ge=1, le=500)] = 50


class ReplayItem(BaseModel):
    series_instance_uid: str
    modality: str
    series_description: str
    instance_count: int
    last_received_at: datetime
    matched: bool
    conditions: list[ConditionPublic]
    other_rules: list[str]  # current rules (other ids) that also match this series


class RuleReplay(BaseModel):
    series_checked: int
    matched: int
    items: list[ReplayItem]


class RuleDiff(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: int = Field(alias="from")
    to: int
    diff: str


# -- destinations, models, audit ---------------------------------------------------------------------------


class DeliveryPublic(BaseModel):
    job_id: int
    status: JobStatus
    finished_at: datetime | None
    verified: bool
    error: str | None


class DeliveryCounts(BaseModel):
    succeeded: int
    dead: int
    failed: int
    queued: int


class DestinationPublic(BaseModel):
    name: str
    type: str
    address: str
    options: dict[str, Any]
    recent: list[DeliveryPublic]
    counts: DeliveryCounts


class ProbePublic(_Public):
    ok: bool
    detail: str
    elapsed_s: float


class WeightsPublic(_Public):
    file: str
    sha256: str
    verified: bool | None


class ModelPublic(_Public):
    name: str
    version: str
    task: str
    format: str
    modalities: list[str]
    body_parts: list[str]
    licence: str
    provenance: str
    intended_use: str
    limits: str
    source: str
    weights: list[WeightsPublic]


class AuditPublic(_Public):
    id: int
    at: datetime
    actor: str
    source: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]
