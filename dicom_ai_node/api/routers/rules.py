"""Routing rules: versioned saves with optimistic concurrency, history, diff, rollback, YAML import/export,
and the dry-run / replay tools that show what a draft would route before it is saved.

Every save is audited with the unified diff of the rule's YAML and the author's comment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import ValidationError

from dicom_ai_node.api.deps import Admin, CtxDep, Viewer, record
from dicom_ai_node.api.params import field_errors
from dicom_ai_node.api.schemas import (
    INT32_MAX,
    ConditionPublic,
    DryRunRequest,
    FieldErrorPublic,
    MatchPublic,
    ReplayItem,
    RuleCreate,
    RuleDetail,
    RuleDiff,
    RuleImport,
    RulePublic,
    RuleReplay,
    RuleReplayRequest,
    RuleRollback,
    RuleUpdate,
    RuleValidate,
    RuleValidation,
    RuleVersionPublic,
    json_safe,
)
from dicom_ai_node.domain.rules import (
    MatchResult,
    Rule,
    RuleSet,
    match_rule,
    rule_diff,
    rule_field_errors,
    ruleset_field_errors,
    ruleset_to_yaml,
)
from dicom_ai_node.errors import RuleConflictError
from dicom_ai_node.persistence.rules_store import RuleVersion
from dicom_ai_node.persistence.series_attrs import series_attributes

router = APIRouter(prefix="/api/rules", tags=["rules"])

RuleId = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
VersionPath = Annotated[int, Path(ge=1, le=INT32_MAX)]
Loc = Sequence[str | int]


# -- helpers ---------------------------------------------------------------------------------------------


def _rule_errors(ctx: CtxDep, data: Any) -> list[tuple[Loc, str]]:
    models = [m.name for m in ctx.models()]
    destinations = [d.name for d in ctx.destinations]
    return [(e.loc, e.msg) for e in rule_field_errors(data, models, destinations)]


def _pydantic_errors(exc: ValidationError, prefix: Loc = ()) -> list[tuple[Loc, str]]:
    return [((*prefix, *e["loc"]), e["msg"]) for e in exc.errors(include_input=False, include_url=False)]


def _valid_rule(ctx: CtxDep, data: Any) -> Rule:
    """The rule, or 422 with each problem at its field (loc relative to the rule: ["conditions", 0, ...])."""
    errors = _rule_errors(ctx, data)
    if errors:
        raise field_errors(errors)
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        raise field_errors(_pydantic_errors(exc)) from None


def _rule_json(rule: Rule) -> dict[str, Any]:
    return rule.model_dump(mode="json", by_alias=True, exclude_none=True)


def _version_public(v: RuleVersion) -> RuleVersionPublic:
    return RuleVersionPublic(
        rule_id=v.rule_id,
        version=v.version,
        change=v.change,
        comment=v.comment,
        created_by=v.created_by,
        created_at=v.created_at,
        deleted=v.deleted,
        rule=_rule_json(v.rule),
    )


def _rule_public(v: RuleVersion) -> RulePublic:
    return RulePublic(
        rule=_rule_json(v.rule),
        version=v.version,
        updated_at=v.created_at,
        updated_by=v.created_by,
        comment=v.comment,
    )


def _content(v: RuleVersion | None) -> Rule | None:
    return None if v is None or v.deleted else v.rule


def _label(rule_id: str, v: RuleVersion | None) -> str:
    return f"{rule_id} v{v.version}" if v is not None else "(none)"


def _audit_save(
    ctx: CtxDep,
    request: Request,
    actor: str,
    action: str,
    old: RuleVersion | None,
    new: RuleVersion,
    comment: str,
) -> None:
    diff = rule_diff(_content(old), _content(new), _label(new.rule_id, old), _label(new.rule_id, new))
    record(
        ctx,
        request,
        actor=actor,
        action=action,
        target=new.rule_id,
        detail={"version": new.version, "comment": comment, "diff": diff},
    )


def _conditions(result: MatchResult) -> list[ConditionPublic]:
    return [
        ConditionPublic(condition=c.condition, value=json_safe(c.value), matched=c.matched)
        for c in result.conditions
    ]


def _match_public(rule: Rule, attrs: dict[str, Any]) -> MatchPublic:
    result = match_rule(rule, attrs)
    return MatchPublic(
        rule_id=rule.id,
        rule_version=rule.version,
        matched=result.matched,
        model=rule.action.model,
        destinations=list(rule.action.destinations),
        conditions=_conditions(result),
    )


def _current(ctx: CtxDep, rule_id: str) -> RuleVersion:
    current = ctx.rules.get(rule_id)
    if current is None:
        raise HTTPException(404, f"no rule {rule_id!r}")
    return current


# -- collection ------------------------------------------------------------------------------------------


@router.get("")
def list_rules(ctx: CtxDep, _: Viewer) -> list[RulePublic]:
    """Current rules (enabled and disabled), highest priority first, then by id."""
    current = ctx.rules.list_current()
    return [_rule_public(v) for v in current]


@router.post("", status_code=201, responses={409: {}, 422: {}})
def create_rule(body: RuleCreate, request: Request, ctx: CtxDep, principal: Admin) -> RuleVersionPublic:
    rule = _valid_rule(ctx, body.rule)
    try:
        saved = ctx.rules.create(rule, actor=principal.username, comment=body.comment)
    except RuleConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    _audit_save(ctx, request, principal.username, "rule.create", None, saved, body.comment)
    return _version_public(saved)


@router.get("/export", response_class=Response, responses={200: {"content": {"application/yaml": {}}}})
def export_rules(ctx: CtxDep, _: Viewer) -> Response:
    """The current rule set as rules.yaml (the same format the node seeds from)."""
    return Response(
        ruleset_to_yaml(ctx.rules.export()),
        media_type="application/yaml",
        headers={"Content-Disposition": 'attachment; filename="rules.yaml"'},
    )


@router.post("/import", responses={422: {}})
def import_rules(
    body: RuleImport, request: Request, ctx: CtxDep, principal: Admin
) -> list[RuleVersionPublic]:
    """Rules whose content differs get a new version; with `replace`, rules missing from the file are deleted."""
    try:
        data = yaml.safe_load(body.yaml)
    except yaml.YAMLError as exc:
        raise field_errors([(("yaml",), f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        # An empty file with `replace` would delete every rule: demand the list, even an empty one.
        raise field_errors([(("yaml",), "expected a mapping with a 'rules' list")])
    models = [m.name for m in ctx.models()]
    destinations = [d.name for d in ctx.destinations]
    errors = ruleset_field_errors(data, models, destinations)
    if errors:
        raise field_errors((e.loc, e.msg) for e in errors)
    try:
        ruleset = RuleSet.model_validate(data)
    except ValidationError as exc:
        raise field_errors(_pydantic_errors(exc)) from None
    before = {r.id: r for r in ctx.rules.export().rules}
    try:
        saved = ctx.rules.import_ruleset(
            ruleset, actor=principal.username, comment=body.comment, replace=body.replace
        )
    except RuleConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    diffs = {
        v.rule_id: rule_diff(before.get(v.rule_id), _content(v), f"{v.rule_id} before", _label(v.rule_id, v))
        for v in saved
    }
    record(
        ctx,
        request,
        actor=principal.username,
        action="rule.import",
        target=f"{len(saved)} rules",
        detail={
            "comment": body.comment,
            "replace": body.replace,
            "changed": [{"rule_id": v.rule_id, "version": v.version, "change": v.change} for v in saved],
            "diffs": diffs,
        },
    )
    return [_version_public(v) for v in saved]


@router.post("/validate")
def validate_rule(body: RuleValidate, ctx: CtxDep, _: Viewer) -> RuleValidation:
    """Field errors for the editor; never 422 (an invalid draft is the expected case here)."""
    errors = _rule_errors(ctx, body.rule)
    return RuleValidation(
        ok=not errors, errors=[FieldErrorPublic(loc=list(loc), msg=msg) for loc, msg in errors]
    )


@router.post("/dry-run", responses={404: {}, 422: {}})
def dry_run(body: DryRunRequest, ctx: CtxDep, _: Viewer) -> list[MatchPublic]:
    """Which rules (the draft, or every current rule) match a stored series or given header attributes,
    and which attribute values decided."""
    if body.series_instance_uid is not None:
        row = ctx.repo.get_series(body.series_instance_uid)
        if row is None:
            raise HTTPException(404, "no such series")
        attrs = series_attributes(row)
    elif body.attributes is not None:
        attrs = body.attributes
    else:
        raise field_errors([(("body",), "give series_instance_uid or attributes")])
    rules = [_valid_rule(ctx, body.rule)] if body.rule is not None else ctx.rules().rules
    return [_match_public(rule, attrs) for rule in rules]


@router.post("/replay", responses={422: {}})
def replay(body: RuleReplayRequest, ctx: CtxDep, _: Viewer) -> RuleReplay:
    """The draft against the last `limit` received series, naming the current rules that also match each."""
    draft = _valid_rule(ctx, body.rule)
    others = [r for r in ctx.rules().rules if r.id != draft.id]
    items: list[ReplayItem] = []
    for row in ctx.repo.list_series(limit=body.limit):
        attrs = series_attributes(row)
        result = match_rule(draft, attrs)
        items.append(
            ReplayItem(
                series_instance_uid=row.series_instance_uid,
                modality=row.modality,
                series_description=row.series_description,
                instance_count=row.instance_count,
                last_received_at=row.last_received_at,
                matched=result.matched,
                conditions=_conditions(result),
                other_rules=[r.id for r in others if match_rule(r, attrs).matched],
            )
        )
    return RuleReplay(series_checked=len(items), matched=sum(i.matched for i in items), items=items)


# -- one rule --------------------------------------------------------------------------------------------


@router.get("/{rule_id}", responses={404: {}})
def get_rule(rule_id: RuleId, ctx: CtxDep, _: Viewer) -> RuleDetail:
    """The current version and the whole history (newest first); a deleted rule keeps its history."""
    history = ctx.rules.history(rule_id)
    if not history:
        raise HTTPException(404, f"no rule {rule_id!r}")
    current = ctx.rules.get(rule_id)
    return RuleDetail(
        rule=_rule_public(current) if current is not None else None,
        history=[_version_public(v) for v in history],
    )


@router.put("/{rule_id}", responses={404: {}, 409: {}, 422: {}})
def update_rule(
    rule_id: RuleId, body: RuleUpdate, request: Request, ctx: CtxDep, principal: Admin
) -> RuleVersionPublic:
    """Saves a new version if `expected_version` is still the current one (else 409: reload and merge)."""
    current = _current(ctx, rule_id)
    rule = _valid_rule(ctx, body.rule)
    if rule.id != rule_id:
        raise field_errors([(("id",), f"the rule id cannot change here ({rule_id!r}); create a new rule")])
    try:
        saved = ctx.rules.update(
            rule, actor=principal.username, comment=body.comment, expected_version=body.expected_version
        )
    except RuleConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    _audit_save(ctx, request, principal.username, "rule.update", current, saved, body.comment)
    return _version_public(saved)


@router.delete("/{rule_id}", responses={404: {}, 409: {}})
def delete_rule(
    rule_id: RuleId,
    request: Request,
    ctx: CtxDep,
    principal: Admin,
    expected_version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
    comment: Annotated[str, Query(max_length=2000, pattern=r"^[^\x00]*$")] = "",
) -> RuleVersionPublic:
    current = _current(ctx, rule_id)
    try:
        saved = ctx.rules.delete(
            rule_id, actor=principal.username, comment=comment, expected_version=expected_version
        )
    except RuleConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    _audit_save(ctx, request, principal.username, "rule.delete", current, saved, comment)
    return _version_public(saved)


@router.post("/{rule_id}/rollback", responses={404: {}, 409: {}})
def rollback_rule(
    rule_id: RuleId, body: RuleRollback, request: Request, ctx: CtxDep, principal: Admin
) -> RuleVersionPublic:
    """A new version with the content of an old one (history is never rewritten)."""
    if ctx.rules.version(rule_id, body.version) is None:
        raise HTTPException(404, f"rule {rule_id!r} has no version {body.version}")
    current = ctx.rules.get(rule_id)
    try:
        saved = ctx.rules.rollback(rule_id, body.version, actor=principal.username, comment=body.comment)
    except RuleConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    _audit_save(ctx, request, principal.username, "rule.rollback", current, saved, body.comment)
    return _version_public(saved)


@router.get("/{rule_id}/versions/{version}", responses={404: {}})
def get_rule_version(rule_id: RuleId, version: VersionPath, ctx: CtxDep, _: Viewer) -> RuleVersionPublic:
    found = ctx.rules.version(rule_id, version)
    if found is None:
        raise HTTPException(404, f"rule {rule_id!r} has no version {version}")
    return _version_public(found)


@router.get("/{rule_id}/diff", responses={404: {}})
def diff_rule(
    rule_id: RuleId,
    ctx: CtxDep,
    _: Viewer,
    from_: Annotated[int | None, Query(alias="from", ge=1, le=INT32_MAX)] = None,
    to: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> RuleDiff:
    """Unified diff of two versions' YAML; by default the current version against the one before it."""
    history = ctx.rules.history(rule_id)
    if not history:
        raise HTTPException(404, f"no rule {rule_id!r}")
    new_n = to if to is not None else history[0].version
    old_n = from_ if from_ is not None else max(1, new_n - 1)
    old, new = ctx.rules.version(rule_id, old_n), ctx.rules.version(rule_id, new_n)
    if old is None or new is None:
        raise HTTPException(404, f"rule {rule_id!r} has no version {old_n if old is None else new_n}")
    text = rule_diff(_content(old), _content(new), _label(rule_id, old), _label(rule_id, new))
    return RuleDiff(from_=old_n, to=new_n, diff=text)
