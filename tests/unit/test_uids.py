"""Deterministic result UIDs: same inputs -> same UIDs; any changed input -> new UIDs; all valid."""

from __future__ import annotations

import dataclasses
import re

import pytest
from pydicom import config
from pydicom.valuerep import validate_value

from dicom_ai_node.domain.results import ModelIdentity, ResultUids, RuleIdentity
from dicom_ai_node.encode.uids import (
    deterministic_uid,
    device_observer_uid,
    result_uids,
    segment_tracking_uid,
)

SERIES = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
MODEL = ModelIdentity(name="lungseg", version="1.0.0")
RULE = RuleIdentity(rule_id="chest-ct", rule_version=3)

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 characters.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def all_uids(uids: ResultUids) -> list[str]:
    return [getattr(uids, f.name) for f in dataclasses.fields(uids)]


def assert_valid_uid(uid: str) -> None:
    assert len(uid) <= 64, uid
    assert UID_PATTERN.match(uid), uid
    assert uid.startswith("2.25."), uid
    validate_value("UI", uid, config.RAISE)


def test_same_inputs_give_the_same_uids() -> None:
    first = result_uids(SERIES, MODEL, RULE)
    again = result_uids(SERIES, ModelIdentity(name="lungseg", version="1.0.0"), RuleIdentity("chest-ct", 3))
    assert first == again
    assert result_uids(SERIES, MODEL, RULE, revision=1) == first


def test_the_four_uids_differ_and_are_valid() -> None:
    uids = all_uids(result_uids(SERIES, MODEL, RULE))
    assert len(set(uids)) == 4
    for uid in uids:
        assert_valid_uid(uid)


@pytest.mark.parametrize(
    ("series", "model", "rule", "revision"),
    [
        (SERIES, dataclasses.replace(MODEL, version="1.0.1"), RULE, 1),
        (SERIES, dataclasses.replace(MODEL, name="lungseg2"), RULE, 1),
        (SERIES, MODEL, dataclasses.replace(RULE, rule_version=4), 1),
        (SERIES, MODEL, dataclasses.replace(RULE, rule_id="chest-ct-2"), 1),
        (SERIES, MODEL, RULE, 2),
        (SERIES + "1", MODEL, RULE, 1),
    ],
    ids=["model-version", "model-name", "rule-version", "rule-id", "revision", "source-series"],
)
def test_any_changed_input_gives_all_new_uids(
    series: str, model: ModelIdentity, rule: RuleIdentity, revision: int
) -> None:
    base = set(all_uids(result_uids(SERIES, MODEL, RULE)))
    changed = set(all_uids(result_uids(series, model, rule, revision)))
    assert base.isdisjoint(changed)


def test_model_description_does_not_change_uids() -> None:
    # Only what identifies the computation counts; cosmetic metadata must not fork result series.
    described = dataclasses.replace(MODEL, description="a new blurb")
    assert result_uids(SERIES, described, RULE) == result_uids(SERIES, MODEL, RULE)


def test_revision_starts_at_one() -> None:
    with pytest.raises(ValueError):
        result_uids(SERIES, MODEL, RULE, revision=0)


def test_deterministic_uid_parts_are_unambiguous() -> None:
    assert deterministic_uid("a", "bc") == deterministic_uid("a", "bc")
    assert deterministic_uid("a", "bc") != deterministic_uid("ab", "c")
    assert deterministic_uid("a,b") != deterministic_uid("a", "b")
    assert_valid_uid(deterministic_uid("x" * 10_000))
    with pytest.raises(ValueError):
        deterministic_uid()


def test_segment_tracking_and_device_uids_are_stable_and_distinct() -> None:
    uids = result_uids(SERIES, MODEL, RULE)
    tracking = {segment_tracking_uid(uids, label) for label in (1, 2, 3)}
    assert len(tracking) == 3
    assert segment_tracking_uid(uids, 1) == segment_tracking_uid(result_uids(SERIES, MODEL, RULE), 1)
    assert segment_tracking_uid(uids, 1) != segment_tracking_uid(result_uids(SERIES, MODEL, RULE, 2), 1)
    device = device_observer_uid("serial-1", MODEL)
    assert device == device_observer_uid("serial-1", MODEL)
    assert device != device_observer_uid("serial-2", MODEL)
    for uid in (*tracking, device):
        assert_valid_uid(uid)
