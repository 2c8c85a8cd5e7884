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

import difflib
import re
from collections.abc import Collection, Mapping, Sequence
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


# -- YAML text, diffs and field errors (the admin page's editor and the rules import/export) ------------

# Condition options left out of the YAML text when they have their default value, so that each condition
# reads like the hand-written rules.yaml: {attribute: Modality, equals: MR}.
_CONDITION_DEFAULTS = {"case_sensitive": False, "if_missing": "no_match"}


class _FlowDict(dict[str, Any]):
    """A mapping written on one line (a condition): one changed condition is one changed diff line."""


class _FlowList(list[Any]):
    """A list written on one line (destinations, `in` values)."""


class _RuleDumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no type hints
    pass


_RuleDumper.add_representer(
    _FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True)
)
_RuleDumper.add_representer(
    _FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _rule_data(rule: Rule) -> dict[str, Any]:
    data = rule.model_dump(mode="json", by_alias=True, exclude_none=True)
    conditions = []
    for cond in data["conditions"]:
        kept = {k: v for k, v in cond.items() if _CONDITION_DEFAULTS.get(k, object()) != v}
        conditions.append(_FlowDict({k: _FlowList(v) if isinstance(v, list) else v for k, v in kept.items()}))
    data["conditions"] = conditions
    data["action"]["destinations"] = _FlowList(data["action"]["destinations"])
    return data


def _dump(data: Any) -> str:
    # A wide line limit keeps long regexes on their condition's line (stable diffs).
    return str(yaml.dump(data, Dumper=_RuleDumper, sort_keys=False, allow_unicode=True, width=4096))


def rule_to_yaml(rule: Rule) -> str:
    """One rule as YAML text in field order (id, version, description, enabled, conditions, action)."""
    return _dump(_rule_data(rule))


def ruleset_to_yaml(ruleset: RuleSet) -> str:
    """A rules file: ``parse_rules(yaml.safe_load(text))`` gives `ruleset` back."""
    return _dump({"rules": [_rule_data(r) for r in ruleset.rules]})


def rule_diff(old: Rule | None, new: Rule | None, old_label: str, new_label: str) -> str:
    """Unified diff of two rules' YAML texts ("" when equal); None stands for "no rule" (create/delete)."""
    old_lines = rule_to_yaml(old).splitlines(keepends=True) if old is not None else []
    new_lines = rule_to_yaml(new).splitlines(keepends=True) if new is not None else []
    return "".join(difflib.unified_diff(old_lines, new_lines, fromfile=old_label, tofile=new_label))


def same_rule_content(a: Rule, b: Rule) -> bool:
    """True when the rules differ at most in their version number."""
    return a.model_dump(exclude={"version"}) == b.model_dump(exclude={"version"})


@dataclass(frozen=True)
class FieldError:
    """One problem with a rule, at its place in the rule's data: ("conditions", 1, "attribute")."""

    loc: tuple[str | int, ...]
    msg: str


def rule_field_errors(
    data: Any, models: Collection[str] | None = None, destinations: Collection[str] | None = None
) -> list[FieldError]:
    """Every problem with one rule's data (as parsed from JSON/YAML), each at its field path.

    Unknown models and destinations are reported (at ``("action", "model")`` and
    ``("action", "destinations", i)``) when the respective names are given. An empty list: the rule is valid.
    """
    errors: list[FieldError] = []
    try:
        Rule.model_validate(data)
    except ValidationError as exc:
        errors.extend(_field_errors(exc, data))
    errors.extend(_reference_errors(data, models, destinations))
    return _merged(errors)


def ruleset_field_errors(
    data: Any, models: Collection[str] | None = None, destinations: Collection[str] | None = None
) -> list[FieldError]:
    """Like `rule_field_errors` for a whole rules file; locations start with ("rules", i)."""
    errors: list[FieldError] = []
    try:
        RuleSet.model_validate(data or {})
    except ValidationError as exc:
        # The set-level duplicate check is reported below at each repeated id instead.
        errors.extend(e for e in _field_errors(exc, data or {}) if e.loc != ())
    if isinstance(data, Mapping) and isinstance(data.get("rules"), list):
        seen: set[str] = set()
        for i, rule_data in enumerate(data["rules"]):
            rule_id = rule_data.get("id") if isinstance(rule_data, Mapping) else None
            if isinstance(rule_id, str):
                if rule_id in seen:
                    errors.append(FieldError(("rules", i, "id"), f"duplicate rule id {rule_id!r}"))
                seen.add(rule_id)
            for err in _reference_errors(rule_data, models, destinations):
                errors.append(FieldError(("rules", i, *err.loc), err.msg))
    return _merged(errors)


def _field_errors(exc: ValidationError, data: Any) -> list[FieldError]:
    return [FieldError(_data_loc(err["loc"], data), _clean_msg(err["msg"])) for err in exc.errors()]


def _clean_msg(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _data_loc(loc: tuple[str | int, ...], data: Any) -> tuple[str | int, ...]:
    """Pydantic's error location cut to the path that exists in the data.

    Pydantic appends union member names (("equals", "str")) and markers ("[key]") that are not places in
    the rule; a missing field keeps its own name as the last part. The `in` operator is named "in" even
    when the data spelled it "in_".
    """
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        key: str | int = "in" if part == "in_" else part
        if isinstance(node, Mapping) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i == len(loc) - 1 and isinstance(node, Mapping) and isinstance(part, str):
            out.append(key)  # a missing field
            break
        else:
            break
        out.append(key)
    return tuple(out)


def _reference_errors(
    data: Any, models: Collection[str] | None, destinations: Collection[str] | None
) -> list[FieldError]:
    action = data.get("action") if isinstance(data, Mapping) else None
    if not isinstance(action, Mapping):
        return []
    errors = []
    model = action.get("model")
    if models is not None and isinstance(model, str) and model not in models:
        known = ", ".join(sorted(models)) or "none"
        errors.append(FieldError(("action", "model"), f"unknown model {model!r}; known models: {known}"))
    dests = action.get("destinations")
    if destinations is not None and isinstance(dests, list):
        known = ", ".join(sorted(destinations)) or "none"
        for i, dest in enumerate(dests):
            if isinstance(dest, str) and dest not in destinations:
                errors.append(
                    FieldError(("action", "destinations", i), f"unknown destination {dest!r}; known: {known}")
                )
    return errors


def _merged(errors: list[FieldError]) -> list[FieldError]:
    """One error per location (a union failure yields one message per member type)."""
    by_loc: dict[tuple[str | int, ...], list[str]] = {}
    for err in errors:
        msgs = by_loc.setdefault(err.loc, [])
        if err.msg not in msgs:
            msgs.append(err.msg)
    return [FieldError(loc, "; ".join(msgs)) for loc, msgs in by_loc.items()]
