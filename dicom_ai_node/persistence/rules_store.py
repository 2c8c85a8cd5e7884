"""Routing rules as versioned rows: who changed what, when and why, with rollback (DESIGN.md, "Routing rules").

`rules` holds each rule's current version number; `rule_versions` holds every save, never changed later.
Every save is one transaction that inserts the new version and moves ``rules.current_version`` with a
guarded ``UPDATE ... WHERE current_version = <the version the editor started from>``. When two admins
save the same rule at once, exactly one UPDATE matches a row; the other save raises RuleConflictError
and changes nothing (on SQLite and on PostgreSQL under READ COMMITTED alike).

The stored rule always carries its own version number, so every job and result keeps recording
"rule id + version" exactly as with the rules file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import ValidationError

from dicom_ai_node.domain.rules import Rule, RuleSet, same_rule_content
from dicom_ai_node.errors import RuleConflictError, RuleError
from dicom_ai_node.persistence._common import Clock, utcnow
from dicom_ai_node.persistence.tables import rule_versions, rules

log = logging.getLogger(__name__)

Change = Literal["seed", "create", "update", "rollback", "delete", "import"]
_ACTOR_MAX = 64


@dataclass(frozen=True)
class RuleVersion:
    rule_id: str
    version: int
    # For a delete version: the rule as it was when deleted (with the delete's version number).
    rule: Rule
    change: str
    comment: str
    created_by: str
    created_at: datetime
    deleted: bool


@dataclass(frozen=True)
class _State:
    current_version: int
    deleted: bool


def _sort_key(rule: Rule) -> tuple[int, str]:
    return (-rule.action.priority, rule.id)


class RuleStore:
    """The node's routing rules. Calling the store returns the current RuleSet (what routing uses)."""

    def __init__(self, engine: sa.Engine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._marker: tuple[int, int] | None = None
        self._cached = RuleSet()

    # -- reading -----------------------------------------------------------------------------------

    def __call__(self) -> RuleSet:
        """The current rules (enabled and disabled; deleted ones left out), priority first.

        Cached until rule_versions changes, which any process's save does: the completion sweep calls
        this every second, and one ``count(*), max(id)`` query is all it costs then. The count guards
        against a PostgreSQL save with a lower id committing after a higher one was already seen.
        """
        with self._lock:
            with self._engine.connect() as conn:
                count, max_id = conn.execute(
                    sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(rule_versions.c.id), 0))
                ).one()
                marker = (int(count), int(max_id))
                if marker != self._marker:
                    loaded = []
                    for row in conn.execute(_current_query()).mappings():
                        try:
                            loaded.append(_load_rule(row))
                        except RuleError as exc:
                            log.error("%s; routing without it", exc)
                    self._cached = RuleSet(rules=sorted(loaded, key=_sort_key))
                    self._marker = marker
                    log.info("loaded %d routing rules from the database", len(loaded))
            return self._cached

    def has_history(self) -> bool:
        with self._engine.connect() as conn:
            return conn.execute(sa.select(rule_versions.c.id).limit(1)).first() is not None

    def get(self, rule_id: str) -> RuleVersion | None:
        """The current version of a rule; None when unknown or deleted."""
        with self._engine.connect() as conn:
            row = conn.execute(_current_query().where(rules.c.rule_id == rule_id)).mappings().one_or_none()
        return _version(row) if row is not None else None

    def list_current(self) -> list[RuleVersion]:
        """The current version of every rule that is not deleted, priority first, then id."""
        with self._engine.connect() as conn:
            rows = conn.execute(_current_query()).mappings().all()
        return sorted((_version(r) for r in rows), key=lambda v: _sort_key(v.rule))

    def export(self) -> RuleSet:
        """The current rules as a RuleSet (written out with domain.rules.ruleset_to_yaml)."""
        return RuleSet(rules=[v.rule for v in self.list_current()])

    def history(self, rule_id: str) -> list[RuleVersion]:
        """Every version of a rule, newest first, deletes included; [] when the id was never saved."""
        query = (
            sa.select(rule_versions)
            .where(rule_versions.c.rule_id == rule_id)
            .order_by(rule_versions.c.version.desc())
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_version(r) for r in rows]

    def version(self, rule_id: str, version: int) -> RuleVersion | None:
        query = sa.select(rule_versions).where(
            rule_versions.c.rule_id == rule_id, rule_versions.c.version == version
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return _version(row) if row is not None else None

    # -- writing -----------------------------------------------------------------------------------

    def seed(self, ruleset: RuleSet, actor: str) -> int:
        """Store the rules file's rules when the database has no rule history at all; returns how many.

        Each rule keeps its version number from the file, so results keep the numbers they had. Once any
        history exists (even if every rule was deleted since), this does nothing: the database is the
        source of truth and the file only an import format.
        """
        now = self._clock()
        try:
            with self._transaction() as conn:
                if conn.execute(sa.select(rule_versions.c.id).limit(1)).first() is not None:
                    return 0
                for rule in ruleset.rules:
                    conn.execute(
                        sa.insert(rules).values(
                            rule_id=rule.id, current_version=rule.version, deleted=False, updated_at=now
                        )
                    )
                    self._insert_version(conn, rule, "seed", "", actor, now)
        except RuleConflictError:
            # Another node process seeded at the same moment; its seed stands.
            return 0
        return len(ruleset.rules)

    def create(self, rule: Rule, *, actor: str, comment: str) -> RuleVersion:
        """Add a rule. A new id starts at version 1; a deleted id continues its numbering."""
        now = self._clock()
        with self._transaction() as conn:
            return self._create_in(conn, rule, "create", comment, actor, now)

    def update(self, rule: Rule, *, actor: str, comment: str, expected_version: int) -> RuleVersion:
        """Save a new version of an existing rule; `expected_version` is the version the editor loaded."""
        now = self._clock()
        with self._transaction() as conn:
            state = self._live_state(conn, rule.id)
            _expect(rule.id, state, expected_version)
            return self._advance(conn, rule, state, "update", comment, actor, now)

    def delete(
        self, rule_id: str, *, actor: str, comment: str, expected_version: int | None = None
    ) -> RuleVersion:
        """Take a rule out of the current set; its history stays and saving the id again continues it."""
        now = self._clock()
        with self._transaction() as conn:
            state = self._live_state(conn, rule_id)
            if expected_version is not None:
                _expect(rule_id, state, expected_version)
            return self._delete_in(conn, rule_id, state, comment, actor, now)

    def rollback(self, rule_id: str, to_version: int, *, actor: str, comment: str) -> RuleVersion:
        """Save the content of an earlier version as a NEW version (history is never rewritten).

        Rolling a deleted rule back to a version before its deletion brings it back.
        """
        now = self._clock()
        with self._transaction() as conn:
            state = _state(conn, rule_id)
            if state is None:
                raise RuleConflictError(f"no rule '{rule_id}'")
            row = (
                conn.execute(
                    sa.select(rule_versions).where(
                        rule_versions.c.rule_id == rule_id, rule_versions.c.version == to_version
                    )
                )
                .mappings()
                .one_or_none()
            )
            if row is None:
                raise RuleConflictError(f"rule '{rule_id}' has no version {to_version}")
            if row["change"] == "delete":
                raise RuleConflictError(f"version {to_version} of rule '{rule_id}' is a deletion")
            old = _load_rule(row)
            return self._advance(
                conn, old, state, "rollback", comment or f"rollback to version {to_version}", actor, now
            )

    def import_ruleset(
        self, ruleset: RuleSet, *, actor: str, comment: str, replace: bool = False
    ) -> list[RuleVersion]:
        """Import a rules file in one transaction: rules whose content differs from the current one
        (version numbers ignored) get a new version, unchanged ones none; with `replace`, current rules
        missing from the file are deleted. Returns the versions written, in file order, deletes last."""
        now = self._clock()
        written: list[RuleVersion] = []
        with self._transaction() as conn:
            states = {
                r.rule_id: _State(r.current_version, bool(r.deleted))
                for r in conn.execute(sa.select(rules.c.rule_id, rules.c.current_version, rules.c.deleted))
            }
            current = {row["rule_id"]: _load_rule(row) for row in conn.execute(_current_query()).mappings()}
            for rule in ruleset.rules:
                state = states.get(rule.id)
                if state is None or state.deleted:
                    written.append(self._create_in(conn, rule, "import", comment, actor, now))
                elif not same_rule_content(current[rule.id], rule):
                    written.append(self._advance(conn, rule, state, "import", comment, actor, now))
            if replace:
                keep = {r.id for r in ruleset.rules}
                for rule_id in sorted(set(current) - keep):
                    written.append(self._delete_in(conn, rule_id, states[rule_id], comment, actor, now))
        return written

    # -- internals ---------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except sa.exc.IntegrityError:
            # A concurrent save inserted the same (rule_id, version) or the same new rule id first.
            raise RuleConflictError("the rule was saved by someone else at the same time; reload") from None

    def _live_state(self, conn: sa.Connection, rule_id: str) -> _State:
        state = _state(conn, rule_id)
        if state is None or state.deleted:
            raise RuleConflictError(f"no rule '{rule_id}'" + (" (it was deleted)" if state else ""))
        return state

    def _create_in(
        self, conn: sa.Connection, rule: Rule, change: Change, comment: str, actor: str, now: datetime
    ) -> RuleVersion:
        state = _state(conn, rule.id)
        if state is None:
            conn.execute(
                sa.insert(rules).values(rule_id=rule.id, current_version=1, deleted=False, updated_at=now)
            )
            return self._insert_version(
                conn, rule.model_copy(update={"version": 1}), change, comment, actor, now
            )
        if not state.deleted:
            raise RuleConflictError(f"rule '{rule.id}' already exists")
        return self._advance(conn, rule, state, change, comment, actor, now)

    def _delete_in(
        self, conn: sa.Connection, rule_id: str, state: _State, comment: str, actor: str, now: datetime
    ) -> RuleVersion:
        row = (
            conn.execute(
                sa.select(rule_versions).where(
                    rule_versions.c.rule_id == rule_id, rule_versions.c.version == state.current_version
                )
            )
            .mappings()
            .one()
        )
        return self._advance(conn, _load_rule(row), state, "delete", comment, actor, now, deleted=True)

    def _advance(
        self,
        conn: sa.Connection,
        rule: Rule,
        state: _State,
        change: Change,
        comment: str,
        actor: str,
        now: datetime,
        *,
        deleted: bool = False,
    ) -> RuleVersion:
        """Move the rule from `state` to the next version, guarded against a concurrent save."""
        new_version = state.current_version + 1
        moved = conn.execute(
            sa.update(rules)
            .where(rules.c.rule_id == rule.id, rules.c.current_version == state.current_version)
            .values(current_version=new_version, deleted=deleted, updated_at=now)
        ).rowcount
        if moved != 1:
            raise RuleConflictError(
                f"rule '{rule.id}' was changed by someone else after version {state.current_version}; reload"
            )
        stored = rule.model_copy(update={"version": new_version})
        return self._insert_version(conn, stored, change, comment, actor, now)

    def _insert_version(
        self, conn: sa.Connection, rule: Rule, change: Change, comment: str, actor: str, now: datetime
    ) -> RuleVersion:
        conn.execute(
            sa.insert(rule_versions).values(
                rule_id=rule.id,
                version=rule.version,
                spec=rule.model_dump_json(by_alias=True, exclude_none=True),
                change=change,
                comment=comment,
                created_by=actor[:_ACTOR_MAX],
                created_at=now,
            )
        )
        return RuleVersion(
            rule_id=rule.id,
            version=rule.version,
            rule=rule,
            change=change,
            comment=comment,
            created_by=actor[:_ACTOR_MAX],
            created_at=now,
            deleted=change == "delete",
        )


def _state(conn: sa.Connection, rule_id: str) -> _State | None:
    row = conn.execute(
        sa.select(rules.c.current_version, rules.c.deleted).where(rules.c.rule_id == rule_id)
    ).one_or_none()
    return _State(int(row.current_version), bool(row.deleted)) if row is not None else None


def _expect(rule_id: str, state: _State, expected_version: int) -> None:
    if state.current_version != expected_version:
        raise RuleConflictError(
            f"rule '{rule_id}' is at version {state.current_version}, not {expected_version}: "
            "someone else saved it meanwhile; reload"
        )


def _current_query() -> sa.Select[Any]:
    return (
        sa.select(rule_versions)
        .join(
            rules,
            sa.and_(
                rules.c.rule_id == rule_versions.c.rule_id,
                rules.c.current_version == rule_versions.c.version,
            ),
        )
        .where(rules.c.deleted.is_(False))
    )


def _load_rule(row: Any) -> Rule:
    try:
        return Rule.model_validate_json(row["spec"])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RuleError(
            f"stored rule '{row['rule_id']}' version {row['version']} is no longer valid: {first['msg']}"
        ) from None


def _version(row: Any) -> RuleVersion:
    return RuleVersion(
        rule_id=row["rule_id"],
        version=row["version"],
        rule=_load_rule(row),
        change=row["change"],
        comment=row["comment"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        deleted=row["change"] == "delete",
    )
