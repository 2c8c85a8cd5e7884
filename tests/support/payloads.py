"""Valid job payloads for tests that need a job of some kind but not any particular one."""

from __future__ import annotations

from typing import Any

from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.payloads import DeliverPayload, InferPayload, JobPayload, PullPayload

SERIES_UID = "1.2.826.0.1.3680043.8.498.10"
STUDY_UID = "1.2.826.0.1.3680043.8.498.11"


def infer_payload(**changes: Any) -> InferPayload:
    fields: dict[str, Any] = {
        "series_instance_uid": SERIES_UID,
        "study_instance_uid": STUDY_UID,
        "generation": 1,
        "rule_id": "ct-test",
        "rule_version": 1,
        "model": "threshold",
        "destinations": ["pacs"],
    }
    return InferPayload(**{**fields, **changes})


def deliver_payload(**changes: Any) -> DeliverPayload:
    return DeliverPayload(**{"destination": "pacs", "files": [], **changes})


def pull_payload(**changes: Any) -> PullPayload:
    return PullPayload(**{"source": "pacs", "study_instance_uid": STUDY_UID, **changes})


def payload_for(kind: JobKind, **changes: Any) -> JobPayload:
    if kind == JobKind.INFER:
        return infer_payload(**changes)
    if kind == JobKind.DELIVER:
        return deliver_payload(**changes)
    return pull_payload(**changes)
