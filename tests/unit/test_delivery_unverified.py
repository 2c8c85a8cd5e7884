"""'Delivered, not verified' in the job timeline, the admin API and the metrics (issue 12).

A deliver job that stored everything at a destination without a query service succeeds with
`verified: false` and `verify_error`; the timeline's verified step is skipped and carries the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.timeline import build_timeline
from dicom_ai_node.metrics import NodeMetrics
from tests.support.admin_api import CT_SERIES, make_api

REASON = (
    "pacs offers no query to read back with (PACS accepts none of the proposed SOP classes: "
    "1.2.840.10008.5.1.4.1.2.2.1)"
)
T0 = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)


@dataclass
class _Job:
    id: int
    status: JobStatus
    payload: dict[str, Any]
    result: dict[str, Any] | None = None
    created_at: datetime = T0
    started_at: datetime | None = T0
    finished_at: datetime | None = T0 + timedelta(seconds=2)
    attempts: int = 1
    last_error: str | None = None


def _verified_steps(*deliveries: _Job) -> list[Any]:
    return [s for s in build_timeline(None, None, deliveries) if s.stage == "verified"]


def test_timeline_says_delivered_not_verified_with_the_reason() -> None:
    unverified = _Job(
        1, JobStatus.SUCCEEDED, {"destination": "pacs"}, {"verified": False, "verify_error": REASON}
    )
    verified = _Job(2, JobStatus.SUCCEEDED, {"destination": "archive"}, {"verified": True})
    not_asked = _Job(3, JobStatus.SUCCEEDED, {"destination": "folder"}, {"verified": False})
    steps = build_timeline(None, None, [unverified, verified, not_asked])
    delivered = [(s.status, s.detail["destination"]) for s in steps if s.stage == "delivered"]
    assert delivered == [("done", "pacs"), ("done", "archive"), ("done", "folder")]
    first, second, third = _verified_steps(unverified, verified, not_asked)
    assert (first.status, first.detail) == (
        "skipped",
        {"destination": "pacs", "verified": False, "verify_error": REASON},
    )
    assert first.at == unverified.finished_at  # when the read-back was tried
    assert (second.status, second.detail) == ("done", {"destination": "archive", "verified": True})
    # verify off for that destination: nothing was tried, nothing to explain
    assert (third.status, third.detail, third.at) == (
        "skipped",
        {"destination": "folder", "verified": False},
        None,
    )


def test_job_detail_api_shows_the_unverified_delivery(tmp_path: Path) -> None:
    env = make_api(tmp_path)
    client: TestClient = env.client()
    client.headers["X-CSRF-Token"] = env.sign_in(client, "admin")
    queue = env.ctx.queue
    deliver_id = queue.enqueue(
        JobKind.DELIVER, {"destination": "pacs", "files": ["results/a.dcm"], "series_instance_uid": CT_SERIES}
    )
    job = queue.claim("w", [JobKind.DELIVER], 60)
    assert job is not None and job.id == deliver_id
    queue.succeed(
        deliver_id, "w", {"destination": "pacs", "sent": ["1.2.3"], "verified": False, "verify_error": REASON}
    )

    detail = client.get(f"/api/jobs/{deliver_id}").json()
    assert detail["status"] == "succeeded" and detail["last_error"] is None
    assert detail["result"]["verified"] is False and detail["result"]["verify_error"] == REASON
    [step] = [s for s in detail["timeline"] if s["stage"] == "verified"]
    assert step["status"] == "skipped"
    assert step["detail"] == {"destination": "pacs", "verified": False, "verify_error": REASON}
    listed = client.get("/api/jobs", params={"kind": "deliver"}).json()["items"]
    assert [j["result"]["verify_error"] for j in listed] == [REASON]


def test_unverified_deliveries_are_counted_per_destination() -> None:
    metrics = NodeMetrics()
    metrics.observe_unverified("pacs")
    metrics.observe_unverified("pacs")
    metrics.observe_unverified("archive")
    value = metrics.registry.get_sample_value
    assert value("ainode_deliveries_unverified_total", {"destination": "pacs"}) == 2
    assert value("ainode_deliveries_unverified_total", {"destination": "archive"}) == 1
    assert b'ainode_deliveries_unverified_total{destination="pacs"} 2.0' in metrics.render()
