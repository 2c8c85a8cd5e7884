"""Deterministic UIDs of result objects (PS3.5 B.2: UUID-derived UIDs under the root 2.25).

Re-running the same job (same source series, model version, rule version, revision) yields the very
same UIDs, so a retried job re-sends identical objects and a PACS keeps one result series instead of
accumulating duplicates. Any change in an input yields new UIDs.
"""

from __future__ import annotations

import json
import uuid

from dicom_ai_node.domain.results import ModelIdentity, ResultUids, RuleIdentity

# Fixed for the life of the project: changing it changes every result UID ever produced.
_PROJECT_NAMESPACE = uuid.UUID("9f7e629f-5407-4437-a89e-0f7b2bc629f8")

UUID_UID_ROOT = "2.25"


def deterministic_uid(*parts: str) -> str:
    """A `2.25.<decimal UUID>` UID (at most 44 characters) derived from `parts` with UUID version 5.

    The parts are JSON-encoded as a list before hashing, so ("a", "bc") and ("ab", "c") differ.
    """
    if not parts:
        raise ValueError("deterministic_uid needs at least one part")
    name = json.dumps(list(parts), ensure_ascii=True, separators=(",", ":"))
    # uuid5 sets version and variant bits, so the integer is never 0 and has no leading zero.
    return f"{UUID_UID_ROOT}.{uuid.uuid5(_PROJECT_NAMESPACE, name).int}"


def _job_parts(
    source_series_instance_uid: str, model: ModelIdentity, rule: RuleIdentity, revision: int, variant: str
) -> tuple[str, ...]:
    if revision < 1:
        raise ValueError("revision starts at 1")
    parts = (
        "result",
        source_series_instance_uid,
        model.name,
        model.version,
        rule.rule_id,
        str(rule.rule_version),
        str(revision),
    )
    # The default encoding keeps the UIDs it always had; another encoding of the same result (a
    # destination that wants LABELMAP or all frames) is another object and gets its own UIDs.
    return (*parts, variant) if variant else parts


def result_uids(
    source_series_instance_uid: str,
    model: ModelIdentity,
    rule: RuleIdentity,
    revision: int = 1,
    variant: str = "",
) -> ResultUids:
    """UIDs of the SEG and SR (series and instance) for one (source series, model, rule, revision).

    `revision` is bumped when a late instance forces a re-run of an already processed series, so the
    new results form new series instead of silently overwriting the old ones.
    """
    parts = _job_parts(source_series_instance_uid, model, rule, revision, variant)
    return ResultUids(
        seg_series_instance_uid=deterministic_uid(*parts, "seg-series"),
        seg_sop_instance_uid=deterministic_uid(*parts, "seg-instance"),
        sr_series_instance_uid=deterministic_uid(*parts, "sr-series"),
        sr_sop_instance_uid=deterministic_uid(*parts, "sr-instance"),
    )


def segment_tracking_uid(uids: ResultUids, label_value: int) -> str:
    """Tracking UID of one model label in one result: written to the SEG segment and the SR group.

    Derived from the SEG instance UID, so it is stable across retries and new for each new result.
    """
    return deterministic_uid("segment-tracking", uids.seg_sop_instance_uid, str(label_value))


def device_observer_uid(device_serial_number: str, model: ModelIdentity) -> str:
    """Device Observer UID (TID 1004) of this node running this model version."""
    return deterministic_uid("device-observer", device_serial_number, model.name, model.version)
