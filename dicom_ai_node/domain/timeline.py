"""The life of one infer job as steps an admin can read: received -> complete -> routed -> inferred ->
encoded -> delivered -> verified (DESIGN.md, "Data flows one way").

Pure: it reads the series times, the infer job and its deliver jobs as given (anything with these
attributes: the persistence rows fit) and says which step is done, running, pending, failed or skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from dicom_ai_node.domain.jobs import JobStatus

StepStatus = Literal["done", "running", "pending", "failed", "skipped"]


class SeriesTimes(Protocol):
    @property
    def instance_count(self) -> int: ...
    @property
    def first_received_at(self) -> datetime: ...
    @property
    def last_received_at(self) -> datetime: ...
    @property
    def routing_started_at(self) -> datetime | None: ...
    @property
    def routed_at(self) -> datetime | None: ...
    @property
    def route_note(self) -> str: ...


class JobTimes(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def status(self) -> JobStatus: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def result(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class TimelineStep:
    stage: str
    status: StepStatus
    at: datetime | None = None  # when the step ended (or began, while it runs)
    duration_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


_STEP_OF_JOB: dict[JobStatus, StepStatus] = {
    JobStatus.QUEUED: "pending",
    JobStatus.RUNNING: "running",
    JobStatus.FAILED: "running",  # a failed attempt waiting for its retry is still under way
    JobStatus.SUCCEEDED: "done",
    JobStatus.DEAD: "failed",
    JobStatus.CANCELLED: "skipped",
}


def _job_status(job: JobTimes) -> StepStatus:
    return _STEP_OF_JOB[job.status]


def _job_detail(job: JobTimes) -> dict[str, Any]:
    detail: dict[str, Any] = {"job_id": job.id, "attempts": job.attempts}
    if job.last_error and job.status != JobStatus.SUCCEEDED:
        detail["error"] = job.last_error
    return detail


def _timing(result: Mapping[str, Any] | None, key: str) -> float | None:
    timings = (result or {}).get("timings")
    value = timings.get(key) if isinstance(timings, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _series_steps(series: SeriesTimes | None) -> list[TimelineStep]:
    if series is None:  # purged long ago or never known: nothing to say about reception
        return [TimelineStep("received", "skipped"), TimelineStep("complete", "skipped")]
    completed = series.routing_started_at or series.routed_at
    return [
        TimelineStep(
            "received",
            "done",
            series.last_received_at,
            _seconds(series.first_received_at, series.last_received_at),
            {"instances": series.instance_count, "first_received_at": series.first_received_at.isoformat()},
        ),
        TimelineStep(
            "complete",
            "done" if completed else "pending",
            completed,
            _seconds(series.last_received_at, completed),
        ),
    ]


def _infer_steps(infer: JobTimes) -> list[TimelineStep]:
    status = _job_status(infer)
    load_s, infer_s, encode_s = (_timing(infer.result, k) for k in ("load_s", "infer_s", "encode_s"))
    if status != "done":
        # Which of the two stages failed is not recorded; the error text says.
        return [
            TimelineStep("inferred", status, infer.started_at, None, _job_detail(infer)),
            TimelineStep("encoded", "skipped" if status in ("failed", "skipped") else "pending"),
        ]
    start = infer.started_at
    inferred_at = encoded_at = infer.finished_at
    model_s = None
    if start is not None and load_s is not None and infer_s is not None:
        model_s = load_s + infer_s
        inferred_at = start + timedelta(seconds=model_s)
        if encode_s is not None:
            encoded_at = inferred_at + timedelta(seconds=encode_s)
    result = infer.result or {}
    return [
        TimelineStep(
            "inferred",
            "done",
            inferred_at,
            model_s,
            {**_job_detail(infer), "model": result.get("model"), "device": result.get("device")},
        ),
        TimelineStep("encoded", "done", encoded_at, encode_s, {"job_id": infer.id}),
    ]


def _delivery_steps(deliveries: Sequence[JobTimes]) -> list[TimelineStep]:
    steps: list[TimelineStep] = []
    for job in sorted(deliveries, key=lambda j: j.id):
        destination = str(job.payload.get("destination", ""))
        status = _job_status(job)
        steps.append(
            TimelineStep(
                "delivered",
                status,
                job.finished_at if status in ("done", "failed") else job.started_at,
                _seconds(job.started_at, job.finished_at) if status == "done" else None,
                {**_job_detail(job), "destination": destination},
            )
        )
        verified = (job.result or {}).get("verified")
        # Delivered, not verified: stored, but the destination offers no query to read back with.
        verify_error = (job.result or {}).get("verify_error") if status == "done" else None
        detail: dict[str, Any] = {"destination": destination, "verified": bool(verified)}
        if verify_error:
            detail["verify_error"] = str(verify_error)
        steps.append(
            TimelineStep(
                "verified",
                "done"
                if status == "done" and verified
                else ("pending" if status in ("pending", "running") else "skipped"),
                job.finished_at if verified or verify_error else None,
                None,
                detail,
            )
        )
    return steps


def build_timeline(
    infer: JobTimes | None, series: SeriesTimes | None, deliveries: Sequence[JobTimes]
) -> list[TimelineStep]:
    """Steps of one infer job, its series and its deliver jobs (one delivered/verified pair each).

    Without the infer job (a deliver job whose parent is gone) only reception and delivery are shown.
    """
    steps = _series_steps(series)
    if infer is None:
        return steps + _delivery_steps(deliveries)
    routed_at = series.routed_at if series is not None else None
    steps.append(
        TimelineStep(
            "routed",
            "done",
            routed_at or infer.created_at,
            None,
            {"rule_id": infer.payload.get("rule_id"), "rule_version": infer.payload.get("rule_version")},
        )
    )
    steps.extend(_infer_steps(infer))
    if deliveries:
        steps.extend(_delivery_steps(deliveries))
    elif _job_status(infer) == "done":
        steps.append(TimelineStep("delivered", "skipped", None, None, {"reason": "no destination"}))
    else:
        steps.append(TimelineStep("delivered", "pending"))
    return steps
