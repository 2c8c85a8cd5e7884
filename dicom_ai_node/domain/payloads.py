"""Typed job payloads: what each job kind's JSON holds (DESIGN.md, "Queue and persistence").

A payload is validated twice: when it is enqueued (`JobQueue.enqueue`) and when a worker claims the job
(`Worker.run_one`). A payload that does not validate is a `PayloadError`, a permanent error: a renamed or
missing key goes to the dead letter at once, naming the field, instead of failing as a KeyError that
the worker would retry with backoff.

Strict on writing, tolerant on reading: unknown keys are refused, but rows written before payloads
carried a version (no "version" key; every job of a database made before issue 11) read as version 1,
the shape they have. A later shape bumps `PAYLOAD_VERSION` and upgrades older rows in a `mode="before"`
validator, so stored jobs keep running across an upgrade.

Payloads hold UIDs and names, never PHI: the admin page shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.errors import PermanentError

PAYLOAD_VERSION: Final = 1


class PayloadError(PermanentError):
    """A job payload does not match its kind's model; the message names the field(s)."""


class BasePayload(BaseModel):
    """Fields every job kind has; a kind's model adds its own and names its `KIND`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[JobKind]

    version: Literal[1] = PAYLOAD_VERSION
    # Set by JobQueue.rerun: the finished job this one runs again (the admin page links them).
    rerun_of: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The stored form: JSON types, unset optional keys left out (the shape older rows have)."""
        return self.model_dump(mode="json", exclude_none=True)


class InferPayload(BasePayload):
    """Run `model` on a received series for one matching rule (written by route/completion.py)."""

    KIND: ClassVar[JobKind] = JobKind.INFER

    series_instance_uid: str = Field(min_length=1)
    # Not read by the stage (the series row has it); kept for the admin page and people reading a job.
    study_instance_uid: str
    # The series' generation when routed: a late instance re-opens the series as the next generation,
    # whose results are a new revision with new UIDs.
    generation: int = Field(default=1, ge=1)
    rule_id: str = Field(min_length=1)
    rule_version: int = Field(ge=1)
    model: str = Field(min_length=1)
    destinations: list[str]


class DeliverPayload(BasePayload):
    """Send result files from the spool to one destination (written by the infer stage)."""

    KIND: ClassVar[JobKind] = JobKind.DELIVER

    destination: str = Field(min_length=1)
    # Spool paths relative to the spool root.
    files: list[str]
    # The plain BINARY SEG (+ its SR) sent when the destination refuses the LABELMAP SEG in `files`.
    fallback_files: list[str] = Field(default_factory=list)
    # The rest is carried along for the admin page and metrics (filter by series, rule and model; the
    # infer job's deliveries); jobs enqueued by hand or by older versions may lack them.
    series_instance_uid: str | None = None
    infer_job_id: int | None = None
    rule_id: str | None = None
    model: str | None = None


class PullPayload(BasePayload):
    """Retrieve a study (or one series of it) from a configured source (domain.jobs.PullRequest)."""

    KIND: ClassVar[JobKind] = JobKind.PULL

    source: str = Field(min_length=1)
    study_instance_uid: str = Field(min_length=1)
    series_instance_uid: str | None = None


JobPayload = InferPayload | DeliverPayload | PullPayload
P = TypeVar("P", bound=BasePayload)

PAYLOAD_MODELS: Mapping[JobKind, type[JobPayload]] = {
    JobKind.INFER: InferPayload,
    JobKind.DELIVER: DeliverPayload,
    JobKind.PULL: PullPayload,
}


def parse_payload(
    kind: JobKind, data: JobPayload | Mapping[str, Any], *, job_id: int | None = None
) -> JobPayload:
    """`data` as `kind`'s payload model; PayloadError naming the field(s) when it does not validate."""
    return parse_as(PAYLOAD_MODELS[JobKind(kind)], data, job_id=job_id)


def parse_as(model: type[P], data: JobPayload | Mapping[str, Any], *, job_id: int | None = None) -> P:
    """`data` as `model` (a model instance of another kind is refused too)."""
    where = (
        f"payload of {model.KIND.value} job {job_id}" if job_id is not None else f"{model.KIND.value} payload"
    )
    if isinstance(data, BaseModel):
        if not isinstance(data, model):
            raise PayloadError(f"{where} is a {type(data).__name__}, expected {model.__name__}")
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PayloadError(f"{where} does not validate: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """'rule_version: Field required; destinations.0: Input should be a valid string'.

    Locations and messages only, never the input values: a payload is no place for PHI, but a wrong
    one could still carry some, and this text is stored as the job's last_error.
    """
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"]) or "payload"
        parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)
