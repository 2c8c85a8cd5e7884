"""Routing rules: typed data (never code strings) matched against a series' header attributes.

A rule has conditions over DICOM keywords and an action (model + destinations + priority + quiet period).
Every condition must hold (AND). Each condition uses exactly one operator:

- ``equals``: value equality (strings compared case-insensitively unless ``case_sensitive``)
- ``in``: one of a list of values
- ``regex``: Python regular expression, searched (not anchored) in the value
- ``range``: ``{min: .., max: ..}`` inclusive numeric bounds (either may be omitted)
- ``present``: true = the attribute has a non-empty value; false = it is missing or empty

Null semantics: when the attribute is missing or empty, an ``equals``/``in``/``regex``/``range`` condition
is false unless ``if_missing: match`` is given (so "BodyPartExamined in [HEAD, BRAIN]" does not silently
route series that lack the attribute). ``present`` is the explicit way to test for absence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_ai_node.errors import RuleError

# Attributes a rule may test. Series-level DICOM keywords plus two node facts: the calling AE title of
# the association that delivered the series and the number of instances received.
MATCHABLE_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "SOPClassUID",
    "CallingAETitle",
    "NumberOfInstances",
    "SliceThickness",
    "ProtocolName",
    "StudyDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "MagneticFieldStrength",
    "ContrastBolusAgent",
)


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    attribute: str
    equals: str | float | None = None
    in_: list[str | float] | None = Field(default=None, alias="in")
    regex: str | None = None
    range: dict[Literal["min", "max"], float] | None = None
    present: bool | None = None
    case_sensitive: bool = False
    if_missing: Literal["no_match", "match"] = "no_match"

    @field_validator("attribute")
    @classmethod
    def _known_attribute(cls, value: str) -> str:
        if value not in MATCHABLE_ATTRIBUTES:
            raise ValueError(f"unknown attribute {value!r}; use one of {', '.join(MATCHABLE_ATTRIBUTES)}")
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regex {value!r}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        ops = [n for n in ("equals", "in_", "regex", "range", "present") if getattr(self, n) is not None]
        if len(ops) != 1:
            raise ValueError(
                f"condition on {self.attribute} needs exactly one of equals/in/regex/range/present"
            )
        return self

    def describe(self) -> str:
        if self.equals is not None:
            return f"{self.attribute} == {self.equals!r}"
        if self.in_ is not None:
            return f"{self.attribute} in {self.in_!r}"
        if self.regex is not None:
            return f"{self.attribute} ~ /{self.regex}/"
        if self.range is not None:
            return f"{self.attribute} in range {self.range}"
        return f"{self.attribute} {'present' if self.present else 'absent'}"


class RuleAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    destinations: list[str] = Field(min_length=1)
    priority: int = 0
    quiet_period_s: float | None = Field(default=None, ge=0)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    version: int = Field(1, ge=1)
    description: str = ""
    enabled: bool = True
    conditions: list[Condition] = Field(min_length=1)
    action: RuleAction


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> RuleSet:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate rule ids: {dupes}")
        return self

    def check_references(self, models: Sequence[str], destinations: Sequence[str]) -> list[str]:
        """Return problems with models/destinations a rule names that do not exist."""
        problems = []
        for rule in self.rules:
            if rule.action.model not in models:
                problems.append(f"rule {rule.id}: unknown model {rule.action.model!r}")
            for dest in rule.action.destinations:
                if dest not in destinations:
                    problems.append(f"rule {rule.id}: unknown destination {dest!r}")
        return problems


@dataclass(frozen=True)
class ConditionResult:
    condition: str
    value: Any
    matched: bool


@dataclass(frozen=True)
class MatchResult:
    """Whether a rule matched and which attribute values decided it (for dry-runs and the job log)."""

    rule_id: str
    matched: bool
    conditions: tuple[ConditionResult, ...]

    def explain(self) -> str:
        marks = [f"{'ok' if c.matched else 'NO'}: {c.condition} (value {c.value!r})" for c in self.conditions]
        return f"rule {self.rule_id} {'matched' if self.matched else 'did not match'}; " + "; ".join(marks)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "") or value == []


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _text_equal(a: Any, b: Any, case_sensitive: bool) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        pass
    sa, sb = _as_text(a), _as_text(b)
    return sa == sb if case_sensitive else sa.casefold() == sb.casefold()


def evaluate_condition(cond: Condition, attrs: Mapping[str, Any]) -> bool:
    value = attrs.get(cond.attribute)
    if cond.present is not None:
        return (not _is_missing(value)) == cond.present
    if _is_missing(value):
        return cond.if_missing == "match"
    if cond.equals is not None:
        return _text_equal(value, cond.equals, cond.case_sensitive)
    if cond.in_ is not None:
        return any(_text_equal(value, option, cond.case_sensitive) for option in cond.in_)
    if cond.regex is not None:
        flags = 0 if cond.case_sensitive else re.IGNORECASE
        return re.search(cond.regex, _as_text(value), flags) is not None
    if cond.range is not None:
        try:
            number = float(str(value))
        except (TypeError, ValueError):
            return False
        low, high = cond.range.get("min"), cond.range.get("max")
        return (low is None or number >= low) and (high is None or number <= high)
    return False  # unreachable: the model validator demands one operator


def match_rule(rule: Rule, attrs: Mapping[str, Any]) -> MatchResult:
    results = tuple(
        ConditionResult(c.describe(), attrs.get(c.attribute), evaluate_condition(c, attrs))
        for c in rule.conditions
    )
    return MatchResult(rule.id, rule.enabled and all(r.matched for r in results), results)


def matching_rules(rules: RuleSet, attrs: Mapping[str, Any]) -> list[tuple[Rule, MatchResult]]:
    """All enabled rules that match, highest action priority first (each one yields its own job)."""
    hits = [(r, m) for r in rules.rules if (m := match_rule(r, attrs)).matched]
    return sorted(hits, key=lambda rm: -rm[0].action.priority)


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    try:
        return RuleSet.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise RuleError(f"{source}: invalid rule at '{loc}': {first['msg']}") from exc


def load_rules(path: Any) -> RuleSet:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise RuleError(f"cannot read rules file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RuleError(f"{path} is not valid YAML: {exc}") from exc
    return parse_rules(data, str(path))
