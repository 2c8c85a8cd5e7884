from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_ai_node.domain.rules import Condition, RuleSet, match_rule, matching_rules, parse_rules
from dicom_ai_node.errors import RuleError
from dicom_ai_node.rules_file import load_rules

RULES = Path(__file__).parents[2] / "config" / "rules.yaml"


def _rule(conditions: list[dict[str, Any]], **action: object) -> RuleSet:
    return parse_rules(
        {
            "rules": [
                {
                    "id": "r1",
                    "conditions": conditions,
                    "action": {"model": "m", "destinations": ["pacs"], **action},
                }
            ]
        }
    )


def test_default_rules_route_brain_mr_and_chest_ct() -> None:
    rules = load_rules(RULES)
    mr = {
        "Modality": "MR",
        "BodyPartExamined": "BRAIN",
        "SeriesDescription": "T1 3D",
        "NumberOfInstances": 181,
    }
    ct = {
        "Modality": "CT",
        "BodyPartExamined": "CHEST",
        "SeriesDescription": "CHEST CT",
        "NumberOfInstances": 48,
    }
    assert [r.action.model for r, _ in matching_rules(rules, mr)] == ["mr-brain"]
    assert [r.action.model for r, _ in matching_rules(rules, ct)] == ["ct-lung"]
    assert matching_rules(rules, {"Modality": "CR", "NumberOfInstances": 1}) == []
    # A CT of the head must not reach the lung model.
    assert matching_rules(rules, {**ct, "BodyPartExamined": "HEAD"}) == []


@pytest.mark.parametrize(
    "cond,attrs,expected",
    [
        ({"attribute": "Modality", "equals": "ct"}, {"Modality": "CT"}, True),
        ({"attribute": "Modality", "equals": "ct", "case_sensitive": True}, {"Modality": "CT"}, False),
        ({"attribute": "Modality", "in": ["CT", "MR"]}, {"Modality": "MR"}, True),
        ({"attribute": "SeriesDescription", "regex": "t1"}, {"SeriesDescription": "Sag T1 MPRAGE"}, True),
        ({"attribute": "SeriesDescription", "regex": "^t2"}, {"SeriesDescription": "Sag T1"}, False),
        ({"attribute": "SliceThickness", "range": {"max": 2.5}}, {"SliceThickness": 1.0}, True),
        ({"attribute": "SliceThickness", "range": {"max": 2.5}}, {"SliceThickness": "5"}, False),
        ({"attribute": "SliceThickness", "range": {"min": 1}}, {"SliceThickness": "abc"}, False),
        ({"attribute": "NumberOfInstances", "equals": 20}, {"NumberOfInstances": 20}, True),
        (
            {"attribute": "ImageType", "regex": "PRIMARY"},
            {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]},
            True,
        ),
        ({"attribute": "CallingAETitle", "equals": "CT01"}, {"CallingAETitle": "CT01"}, True),
        # null semantics: missing attributes fail unless if_missing: match; `present` tests absence
        ({"attribute": "BodyPartExamined", "in": ["CHEST"]}, {}, False),
        ({"attribute": "BodyPartExamined", "in": ["CHEST"], "if_missing": "match"}, {}, True),
        ({"attribute": "BodyPartExamined", "in": ["CHEST"]}, {"BodyPartExamined": "  "}, False),
        ({"attribute": "BodyPartExamined", "present": False}, {"BodyPartExamined": ""}, True),
        ({"attribute": "BodyPartExamined", "present": True}, {"BodyPartExamined": "CHEST"}, True),
    ],
)
def test_operators(cond: dict[str, Any], attrs: dict[str, Any], expected: bool) -> None:
    assert match_rule(_rule([cond]).rules[0], attrs).matched is expected


def test_explanation_names_the_deciding_attributes() -> None:
    rule = _rule(
        [{"attribute": "Modality", "equals": "CT"}, {"attribute": "NumberOfInstances", "range": {"min": 20}}]
    )
    result = match_rule(rule.rules[0], {"Modality": "CT", "NumberOfInstances": 5})
    assert not result.matched
    assert [c.matched for c in result.conditions] == [True, False]
    assert "NumberOfInstances" in result.explain() and "NO" in result.explain()


def test_disabled_rule_never_matches() -> None:
    rs = parse_rules(
        {
            "rules": [
                {
                    "id": "r",
                    "enabled": False,
                    "conditions": [{"attribute": "Modality", "equals": "CT"}],
                    "action": {"model": "m", "destinations": ["d"]},
                }
            ]
        }
    )
    assert not match_rule(rs.rules[0], {"Modality": "CT"}).matched


@pytest.mark.parametrize(
    "bad,needle",
    [
        (
            {
                "rules": [
                    {
                        "id": "r",
                        "conditions": [{"attribute": "PatientName", "equals": "x"}],
                        "action": {"model": "m", "destinations": ["d"]},
                    }
                ]
            },
            "unknown attribute",
        ),
        (
            {
                "rules": [
                    {
                        "id": "r",
                        "conditions": [{"attribute": "Modality", "equals": "CT", "regex": "x"}],
                        "action": {"model": "m", "destinations": ["d"]},
                    }
                ]
            },
            "exactly one",
        ),
        (
            {
                "rules": [
                    {
                        "id": "r",
                        "conditions": [{"attribute": "Modality", "regex": "("}],
                        "action": {"model": "m", "destinations": ["d"]},
                    }
                ]
            },
            "invalid regex",
        ),
        (
            {"rules": [{"id": "r", "conditions": [], "action": {"model": "m", "destinations": ["d"]}}]},
            "conditions",
        ),
        (
            {
                "rules": [
                    {
                        "id": "r",
                        "conditions": [{"attribute": "Modality", "equals": "CT"}],
                        "action": {"model": "m", "destinations": ["d"]},
                    }
                ]
                * 2
            },
            "duplicate rule ids",
        ),
    ],
)
def test_invalid_rules_give_clear_errors(bad: dict[str, Any], needle: str) -> None:
    with pytest.raises(RuleError, match=needle):
        parse_rules(bad)


def test_check_references() -> None:
    rules = load_rules(RULES)
    assert rules.check_references(["mr-brain", "ct-lung"], ["pacs"]) == []
    problems = rules.check_references(["mr-brain"], [])
    assert any("ct-lung" in p for p in problems) and any("'pacs'" in p for p in problems)


def test_condition_requires_an_operator() -> None:
    with pytest.raises(ValueError):
        Condition(attribute="Modality")
