"""Rules as YAML text, rule diffs, and field errors for the admin page's rule editor."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_ai_node.domain.rules import (
    FieldError,
    Rule,
    parse_rules,
    rule_diff,
    rule_field_errors,
    rule_to_yaml,
    ruleset_field_errors,
    ruleset_to_yaml,
    same_rule_content,
)
from dicom_ai_node.rules_file import load_rules

RULES_YAML = Path(__file__).parents[2] / "config" / "rules.yaml"
MODELS = ["ct-lung", "mr-brain"]
DESTINATIONS = ["pacs", "archive"]

VALID: dict[str, Any] = {
    "id": "ct-chest",
    "version": 1,
    "conditions": [
        {"attribute": "Modality", "equals": "CT"},
        {"attribute": "BodyPartExamined", "in": ["CHEST", "LUNG"], "if_missing": "match"},
    ],
    "action": {"model": "ct-lung", "destinations": ["pacs"]},
}


def with_changes(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


_DELETE = object()


def test_ruleset_yaml_round_trips() -> None:
    ruleset = load_rules(RULES_YAML)
    text = ruleset_to_yaml(ruleset)
    assert parse_rules(yaml.safe_load(text)) == ruleset
    # Reads like the hand-written file: one condition per line, defaults left out, `in` not `in_`.
    assert "- {attribute: BodyPartExamined, in: [BRAIN, HEAD], if_missing: match}" in text
    assert "case_sensitive" not in text and "in_" not in text


def test_rule_yaml_keeps_field_order_and_quotes_ambiguous_strings() -> None:
    rule = Rule.model_validate(
        {
            "id": "odd",
            "description": "yes: a colon, and # a hash",
            "conditions": [
                {"attribute": "SeriesDescription", "regex": "^t1[_ ]?(mprage|tfe)$", "case_sensitive": True},
                {"attribute": "ProtocolName", "equals": "007"},
                {"attribute": "NumberOfInstances", "range": {"min": 20, "max": 400}},
                {"attribute": "ContrastBolusAgent", "present": False},
            ],
            "action": {"model": "mr-brain", "destinations": ["pacs", "archive"], "quiet_period_s": 2.5},
        }
    )
    text = rule_to_yaml(rule)
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith((" ", "-"))] == [
        "id",
        "version",
        "description",
        "enabled",
        "conditions",
        "action",
    ]
    back = Rule.model_validate(yaml.safe_load(text))
    assert back == rule
    assert back.conditions[1].equals == "007"  # still a string, not the number 7


def test_rule_diff() -> None:
    old = Rule.model_validate(VALID)
    new = Rule.model_validate(with_changes(("conditions", 0, "equals"), "MR")).model_copy(
        update={"version": 2}
    )
    diff = rule_diff(old, new, "ct-chest v1", "ct-chest v2")
    lines = diff.splitlines()
    assert lines[:2] == ["--- ct-chest v1", "+++ ct-chest v2"]
    assert "-version: 1" in lines and "+version: 2" in lines
    assert "-- {attribute: Modality, equals: CT}" in lines
    assert "+- {attribute: Modality, equals: MR}" in lines
    assert sum(1 for line in lines if line.startswith(("+", "-"))) == 6  # 2 headers + 2 changed lines x2
    assert rule_diff(old, old, "a", "b") == ""
    created = rule_diff(None, old, "(none)", "v1")
    assert created.startswith("--- (none)\n+++ v1\n") and "+id: ct-chest" in created
    deleted = rule_diff(old, None, "v1", "(deleted)")
    assert "-id: ct-chest" in deleted


def test_same_rule_content_ignores_the_version() -> None:
    rule = Rule.model_validate(VALID)
    assert same_rule_content(rule, rule.model_copy(update={"version": 9}))
    assert not same_rule_content(rule, rule.model_copy(update={"enabled": False}))


def test_a_valid_rule_has_no_field_errors() -> None:
    assert rule_field_errors(VALID, MODELS, DESTINATIONS) == []


@pytest.mark.parametrize(
    ("data", "loc", "msg_start"),
    [
        (
            with_changes(("conditions", 1, "attribute"), "Modalty"),
            ("conditions", 1, "attribute"),
            "unknown attribute 'Modalty'; use one of Modality, ",
        ),
        (
            with_changes(("conditions", 0), {"attribute": "SeriesDescription", "regex": "t1("}),
            ("conditions", 0, "regex"),
            "invalid regex 't1(': missing ), unterminated subpattern",
        ),
        (
            with_changes(("conditions", 0, "regex"), "CT|MR"),
            ("conditions", 0),
            "condition on Modality needs exactly one of equals/in/regex/range/present",
        ),
        (
            with_changes(("conditions", 1, "in"), "CHEST"),
            ("conditions", 1, "in"),
            "Input should be a valid list",
        ),
        (
            with_changes(("action", "destinations"), _DELETE),
            ("action", "destinations"),
            "Field required",
        ),
        (
            with_changes(("action", "destinations"), []),
            ("action", "destinations"),
            "List should have at least 1 item",
        ),
        (
            with_changes(("conditions", 0, "equals"), ["CT"]),
            ("conditions", 0, "equals"),
            "Input should be a valid string; Input should be a valid number",
        ),
        (
            with_changes(("conditions", 0), {"attribute": "SliceThickness", "range": {"mid": 1}}),
            ("conditions", 0, "range", "mid"),
            "Input should be 'min' or 'max'",
        ),
        (with_changes(("id",), "Bad Id"), ("id",), "String should match pattern"),
        (with_changes(("colour",), "red"), ("colour",), "Extra inputs are not permitted"),
    ],
)
def test_field_errors_point_at_the_field(data: Any, loc: tuple[str | int, ...], msg_start: str) -> None:
    errors = rule_field_errors(data, MODELS, DESTINATIONS)
    assert [e.loc for e in errors] == [loc], errors
    assert errors[0].msg.startswith(msg_start), errors[0].msg


def test_in_alias_is_reported_as_in_even_when_spelled_in_() -> None:
    data = copy.deepcopy(VALID)
    data["conditions"][1] = {"attribute": "BodyPartExamined", "in_": 5}
    assert [e.loc for e in rule_field_errors(data)] == [("conditions", 1, "in")]


def test_unknown_model_and_destinations() -> None:
    data = with_changes(("action",), {"model": "ct-lungs", "destinations": ["pacs", "pacs2", "nowhere"]})
    assert rule_field_errors(data, MODELS, DESTINATIONS) == [
        FieldError(("action", "model"), "unknown model 'ct-lungs'; known models: ct-lung, mr-brain"),
        FieldError(("action", "destinations", 1), "unknown destination 'pacs2'; known: archive, pacs"),
        FieldError(("action", "destinations", 2), "unknown destination 'nowhere'; known: archive, pacs"),
    ]
    # Without the lists of names only the rule itself is checked.
    assert rule_field_errors(data) == []


def test_reference_errors_come_with_schema_errors() -> None:
    data = with_changes(("conditions", 0, "attribute"), "Modalty")
    data["action"]["model"] = "nope"
    assert [e.loc for e in rule_field_errors(data, MODELS, DESTINATIONS)] == [
        ("conditions", 0, "attribute"),
        ("action", "model"),
    ]


def test_not_a_mapping() -> None:
    (error,) = rule_field_errors(["not", "a", "rule"], MODELS, DESTINATIONS)
    assert error.loc == () and "valid dictionary" in error.msg


def test_ruleset_field_errors() -> None:
    bad = with_changes(("conditions", 1, "attribute"), "Modalty")
    bad["id"] = "second"
    bad["action"]["destinations"] = ["mars"]
    data = {"rules": [VALID, bad]}
    assert ruleset_field_errors(data, MODELS, DESTINATIONS) == [
        FieldError(("rules", 1, "conditions", 1, "attribute"), rule_field_errors(bad)[0].msg),
        FieldError(
            ("rules", 1, "action", "destinations", 0), "unknown destination 'mars'; known: archive, pacs"
        ),
    ]
    duplicate = {"rules": [VALID, VALID]}
    assert ruleset_field_errors(duplicate) == [FieldError(("rules", 1, "id"), "duplicate rule id 'ct-chest'")]
    (not_a_list,) = ruleset_field_errors({"rules": {"id": "x"}})
    assert not_a_list.loc == ("rules",) and "valid list" in not_a_list.msg
    assert ruleset_field_errors(yaml.safe_load(RULES_YAML.read_text()), MODELS, ["pacs"]) == []
    assert ruleset_field_errors(None) == []
