"""Versioned routing rules: identical behaviour on SQLite and PostgreSQL (see conftest.engine)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dicom_ai_node.domain.rules import Rule, RuleSet, parse_rules
from dicom_ai_node.errors import RuleConflictError
from dicom_ai_node.persistence.rules_store import RuleStore
from dicom_ai_node.persistence.tables import rule_versions
from dicom_ai_node.rules_file import load_rules
from tests.contract.conftest import FakeClock

RULES_YAML = Path(__file__).parents[2] / "config" / "rules.yaml"


def make_rule(rule_id: str, *, priority: int = 0, modality: str = "CT", version: int = 1) -> Rule:
    return Rule.model_validate(
        {
            "id": rule_id,
            "version": version,
            "conditions": [{"attribute": "Modality", "equals": modality}],
            "action": {"model": "ct-lung", "destinations": ["pacs"], "priority": priority},
        }
    )


@pytest.fixture
def store(engine: sa.Engine, clock: FakeClock) -> RuleStore:
    return RuleStore(engine, clock=clock)


def test_seed_keeps_file_versions_and_runs_once(store: RuleStore, clock: FakeClock) -> None:
    ruleset = load_rules(RULES_YAML)
    assert not store.has_history() and store() == RuleSet()
    assert store.seed(ruleset, actor="system") == 2
    assert store.has_history()
    current = store()
    assert {r.id: r.version for r in current.rules} == {"mr-brain-extraction": 1, "ct-chest-lungs": 2}
    # Priority first (10 before 5), as matching_rules would order them.
    assert [r.id for r in current.rules] == ["mr-brain-extraction", "ct-chest-lungs"]
    seeded = store.get("ct-chest-lungs")
    assert seeded is not None and seeded.change == "seed" and seeded.created_by == "system"
    assert seeded.rule == ruleset.rules[1] and seeded.created_at == clock.now

    assert store.seed(RuleSet(rules=[make_rule("other")]), actor="system") == 0
    assert [r.id for r in store().rules] == ["mr-brain-extraction", "ct-chest-lungs"]


def test_seed_is_skipped_once_any_history_exists(store: RuleStore) -> None:
    store.create(make_rule("a"), actor="alice", comment="")
    store.delete("a", actor="alice", comment="")
    assert store() == RuleSet()
    assert store.seed(RuleSet(rules=[make_rule("b")]), actor="system") == 0
    assert store() == RuleSet()


def test_create_update_versions_and_history(store: RuleStore, clock: FakeClock) -> None:
    created = store.create(make_rule("ct", version=7), actor="alice", comment="first")
    # The database numbers versions; whatever the editor sent is replaced.
    assert (created.version, created.rule.version, created.change, created.deleted) == (1, 1, "create", False)
    clock.advance(60)
    updated = store.update(make_rule("ct", priority=3), actor="bob", comment="faster", expected_version=1)
    assert (updated.version, updated.rule.version, updated.rule.action.priority) == (2, 2, 3)
    assert (updated.created_by, updated.comment, updated.created_at) == ("bob", "faster", clock.now)

    assert store.get("ct") == updated
    assert store().rules == [updated.rule]
    assert [v.version for v in store.history("ct")] == [2, 1]
    assert store.version("ct", 1) == created
    assert store.version("ct", 3) is None
    assert store.history("nope") == [] and store.get("nope") is None

    with pytest.raises(RuleConflictError, match="already exists"):
        store.create(make_rule("ct"), actor="alice", comment="")
    with pytest.raises(RuleConflictError, match="no rule 'nope'"):
        store.update(make_rule("nope"), actor="alice", comment="", expected_version=1)


def test_stale_expected_version_is_a_conflict(store: RuleStore) -> None:
    store.create(make_rule("ct"), actor="alice", comment="")
    store.update(make_rule("ct", priority=1), actor="alice", comment="", expected_version=1)
    with pytest.raises(RuleConflictError, match="version 2, not 1"):
        store.update(make_rule("ct", priority=9), actor="bob", comment="", expected_version=1)
    current = store.get("ct")
    assert current is not None and current.version == 2 and current.rule.action.priority == 1
    assert len(store.history("ct")) == 2


def test_concurrent_saves_from_the_same_version_one_wins(engine: sa.Engine, clock: FakeClock) -> None:
    RuleStore(engine, clock=clock).create(make_rule("ct"), actor="alice", comment="")
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def save(i: int) -> None:
        store = RuleStore(engine, clock=clock)
        barrier.wait()
        try:
            store.update(make_rule("ct", priority=i), actor=f"user{i}", comment="", expected_version=1)
            outcomes.append("ok")
        except RuleConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 5 + ["ok"]
    assert [v.version for v in RuleStore(engine).history("ct")] == [2, 1]


def test_rollback_writes_a_new_version_with_the_old_content(store: RuleStore) -> None:
    store.create(make_rule("ct", priority=1), actor="alice", comment="")
    store.update(make_rule("ct", priority=2), actor="alice", comment="", expected_version=1)
    rolled = store.rollback("ct", 1, actor="bob", comment="")
    assert (rolled.version, rolled.change, rolled.rule.action.priority) == (3, "rollback", 1)
    assert rolled.rule.version == 3 and rolled.comment == "rollback to version 1"
    assert [v.version for v in store.history("ct")] == [3, 2, 1]
    with pytest.raises(RuleConflictError, match="has no version 9"):
        store.rollback("ct", 9, actor="bob", comment="")
    with pytest.raises(RuleConflictError, match="no rule"):
        store.rollback("nope", 1, actor="bob", comment="")


def test_delete_and_recreate_continue_the_numbering(store: RuleStore) -> None:
    store.create(make_rule("ct"), actor="alice", comment="")
    store.create(make_rule("mr", modality="MR"), actor="alice", comment="")
    with pytest.raises(RuleConflictError, match="version 1, not 5"):
        store.delete("ct", actor="bob", comment="", expected_version=5)
    deleted = store.delete("ct", actor="bob", comment="retired", expected_version=1)
    assert (deleted.version, deleted.change, deleted.deleted, deleted.comment) == (
        2,
        "delete",
        True,
        "retired",
    )
    assert deleted.rule.conditions == make_rule("ct").conditions  # what was deleted stays readable
    assert store.get("ct") is None
    assert [r.id for r in store().rules] == ["mr"]
    assert [r.id for r in store.export().rules] == ["mr"]
    with pytest.raises(RuleConflictError, match="deleted"):
        store.update(make_rule("ct"), actor="bob", comment="", expected_version=2)
    with pytest.raises(RuleConflictError, match="no rule"):
        store.delete("ct", actor="bob", comment="")
    with pytest.raises(RuleConflictError, match="is a deletion"):
        store.rollback("ct", 2, actor="bob", comment="")

    again = store.create(make_rule("ct", priority=4), actor="carol", comment="back")
    assert (again.version, again.change, again.rule.version) == (3, "create", 3)
    assert [v.version for v in store.history("ct")] == [3, 2, 1]
    assert [r.id for r in store().rules] == ["ct", "mr"]

    # Rolling back a deleted rule to a version before its deletion brings it back.
    store.delete("ct", actor="bob", comment="")
    restored = store.rollback("ct", 1, actor="bob", comment="undo")
    assert restored.version == 5 and store.get("ct") == restored


def test_import_versions_only_changed_rules(store: RuleStore) -> None:
    store.seed(RuleSet(rules=[make_rule("a"), make_rule("b", modality="MR")]), actor="system")
    same_content = make_rule("a", version=42)  # the file's version number is not content
    changed = make_rule("b", modality="PT")
    written = store.import_ruleset(
        RuleSet(rules=[same_content, changed, make_rule("c")]), actor="alice", comment="from git"
    )
    assert [(v.rule_id, v.version, v.change) for v in written] == [("b", 2, "import"), ("c", 1, "import")]
    assert all(v.comment == "from git" and v.created_by == "alice" for v in written)
    assert {r.id: r.version for r in store().rules} == {"a": 1, "b": 2, "c": 1}
    assert store.import_ruleset(store.export(), actor="alice", comment="") == []


def test_import_with_replace_deletes_rules_missing_from_the_file(store: RuleStore) -> None:
    for rule_id in ("a", "b", "c"):
        store.create(make_rule(rule_id), actor="alice", comment="")
    store.delete("c", actor="alice", comment="")
    written = store.import_ruleset(
        RuleSet(rules=[make_rule("a"), make_rule("c", priority=2)]), actor="bob", comment="sync", replace=True
    )
    assert [(v.rule_id, v.version, v.change, v.deleted) for v in written] == [
        ("c", 3, "import", False),
        ("b", 2, "delete", True),
    ]
    assert [r.id for r in store().rules] == ["c", "a"]


def test_import_is_all_or_nothing(
    store: RuleStore, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create(make_rule("a"), actor="alice", comment="")
    store.create(make_rule("b"), actor="alice", comment="")
    original_advance = RuleStore._advance

    def racing_advance(self: RuleStore, conn: sa.Connection, rule: Rule, *args: Any, **kwargs: Any) -> Any:
        if rule.id == "b":
            # Another process saves "b" after the import read it: the guarded UPDATE must notice.
            conn.execute(
                sa.text("UPDATE rules SET current_version = current_version + 1 WHERE rule_id = 'b'")
            )
        return original_advance(self, conn, rule, *args, **kwargs)

    monkeypatch.setattr(RuleStore, "_advance", racing_advance)
    with pytest.raises(RuleConflictError, match="changed by someone else"):
        store.import_ruleset(
            RuleSet(rules=[make_rule("a", priority=1), make_rule("b", priority=1)]), actor="x", comment=""
        )
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(rule_versions)).scalar_one() == 2
    # The import's new version of "a" was rolled back with the rest.
    assert [(v.rule_id, v.version) for v in store.list_current()] == [("a", 1), ("b", 1)]


def test_a_second_store_sees_saves_on_its_next_call(engine: sa.Engine, clock: FakeClock) -> None:
    editor, router = RuleStore(engine, clock=clock), RuleStore(engine, clock=clock)
    assert router() == RuleSet()
    cached = router()
    assert router() is cached  # unchanged database: the cached object is returned
    editor.create(make_rule("ct"), actor="alice", comment="")
    assert [r.id for r in router().rules] == ["ct"]
    editor.update(make_rule("ct", priority=5), actor="alice", comment="", expected_version=1)
    assert router().rules[0].action.priority == 5 and router().rules[0].version == 2
    editor.delete("ct", actor="alice", comment="")
    assert router() == RuleSet()


def test_disabled_rules_stay_in_the_current_set(store: RuleStore) -> None:
    rule = make_rule("ct").model_copy(update={"enabled": False})
    store.create(rule, actor="alice", comment="")
    (current,) = store().rules
    assert current.enabled is False


def test_stored_spec_round_trips_the_in_alias(store: RuleStore) -> None:
    rule = parse_rules(
        {
            "rules": [
                {
                    "id": "in-rule",
                    "conditions": [{"attribute": "BodyPartExamined", "in": ["HEAD", "BRAIN"]}],
                    "action": {"model": "mr-brain", "destinations": ["pacs"]},
                }
            ]
        }
    ).rules[0]
    store.create(rule, actor="alice", comment="")
    got = store.get("in-rule")
    assert got is not None and got.rule.conditions[0].in_ == ["HEAD", "BRAIN"]
