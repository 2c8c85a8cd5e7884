"""The audit log: identical behaviour on SQLite and PostgreSQL (append-only triggers: migrations tests)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from dicom_ai_node.persistence.audit import AuditLog
from tests.contract.conftest import FakeClock


@pytest.fixture
def audit(engine: sa.Engine, clock: FakeClock) -> AuditLog:
    return AuditLog(engine, clock=clock)


def test_record_and_read_back(audit: AuditLog, clock: FakeClock) -> None:
    event_id = audit.record(
        actor="alice",
        source="10.0.0.5",
        action="rule.update",
        target="ct-chest-lungs",
        detail={"comment": "raise priority", "version": 3, "diff": "--- v2\n+++ v3\n"},
    )
    (event,) = audit.list_events()
    assert event.id == event_id and event.at == clock.now
    assert (event.actor, event.source, event.action, event.target, event.outcome) == (
        "alice",
        "10.0.0.5",
        "rule.update",
        "ct-chest-lungs",
        "ok",
    )
    assert event.detail == {"comment": "raise priority", "version": 3, "diff": "--- v2\n+++ v3\n"}
    audit.record(actor="cli:root", source="cli", action="user.create", target="bob")
    assert audit.list_events()[0].detail == {}


def test_record_refuses_unknown_outcome(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="outcome"):
        audit.record(actor="a", source="", action="auth.login", outcome="maybe")


def test_long_actor_is_truncated_not_refused(audit: AuditLog) -> None:
    audit.record(actor="x" * 500, source="1.2.3.4", action="auth.login_failed", outcome="failed")
    assert audit.list_events()[0].actor == "x" * 64


def test_list_newest_first_with_paging_and_filters(audit: AuditLog, clock: FakeClock) -> None:
    start = clock.now
    actions = ["auth.login", "auth.login_failed", "rule.create", "rule.update", "ruleset.other", "job.retry"]
    ids = []
    for i, action in enumerate(actions):
        ids.append(audit.record(actor="alice" if i % 2 else "bob", source="cli", action=action))
        clock.advance(60)

    assert [e.id for e in audit.list_events()] == ids[::-1]
    assert [e.id for e in audit.list_events(limit=2)] == ids[:-3:-1]
    assert [e.id for e in audit.list_events(limit=2, before_id=ids[-2])] == [ids[-3], ids[-4]]
    # Dotted prefixes match whole segments: "rule" is not "ruleset", "auth.login" is not auth.login_failed.
    assert [e.action for e in audit.list_events(action="rule.")] == ["rule.update", "rule.create"]
    assert [e.action for e in audit.list_events(action="rule")] == ["rule.update", "rule.create"]
    assert [e.action for e in audit.list_events(action="auth.login")] == ["auth.login"]
    assert [e.action for e in audit.list_events(action="auth")] == ["auth.login_failed", "auth.login"]
    assert {e.actor for e in audit.list_events(actor="alice")} == {"alice"}
    window = audit.list_events(since=start + timedelta(seconds=60), until=start + timedelta(seconds=180))
    assert [e.id for e in window] == [ids[2], ids[1]]


def test_action_filter_escapes_like_wildcards(audit: AuditLog) -> None:
    audit.record(actor="a", source="", action="rule.update")
    assert audit.list_events(action="r%") == []
    assert audit.list_events(action="rule_") == []


def test_count_for_rate_limiting(audit: AuditLog, clock: FakeClock) -> None:
    start = clock.now
    for source in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        audit.record(actor="alice", source=source, action="auth.login_failed", outcome="failed")
        clock.advance(10)
    audit.record(actor="bob", source="10.0.0.1", action="auth.login_failed", outcome="failed")
    audit.record(actor="alice", source="10.0.0.1", action="auth.login")
    assert audit.count(action="auth.login_failed", since=start) == 4
    assert audit.count(action="auth.login_failed", since=start, actor="alice") == 3
    assert audit.count(action="auth.login_failed", since=start, source="10.0.0.1") == 3
    assert audit.count(action="auth.login_failed", since=start, actor="alice", source="10.0.0.1") == 2
    assert audit.count(action="auth.login_failed", since=start + timedelta(seconds=10)) == 3
    assert audit.count(action="auth.login", since=start) == 1
