"""`dicom-ai-node users|tokens|rules ...` as an operator runs them (subprocess, real SQLite database)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from argon2 import PasswordHasher

from dicom_ai_node.domain.auth import Role
from dicom_ai_node.domain.rules import parse_rules
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.rules_store import RuleStore
from dicom_ai_node.rules_file import load_rules

ROOT = Path(__file__).parents[2]
ENTRY_POINT = Path(sys.executable).parent / "dicom-ai-node"
RULES_YAML = ROOT / "config" / "rules.yaml"
PASSWORD = "a long enough password"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "dicom_ai_node.cli"]
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, str]:
    """A config file and its database URL (schema at head, no users, no rules)."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": url,
                "spool_dir": str(tmp_path / "spool"),
                "destinations": [
                    {
                        "name": "pacs",
                        "type": "dicom",
                        "ae_title": "ORTHANC",
                        "host": "127.0.0.1",
                        "port": 4242,
                    }
                ],
            }
        )
    )
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    return config, url


def test_users_lifecycle(node: tuple[Path, str]) -> None:
    config, url = node
    c = str(config)
    added = cli(
        "users", "add", "alice", "--role", "admin", "--password-stdin", "-c", c, stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    assert "user alice added (admin)" in added.stdout

    weak = cli("users", "add", "bob", "--role", "viewer", "--password-stdin", "-c", c, stdin="short\n")
    assert weak.returncode == 1 and weak.stderr.strip() == "error: password must have at least 12 characters"
    dup = cli("users", "add", "alice", "--role", "viewer", "--password-stdin", "-c", c, stdin=PASSWORD + "\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr

    assert cli("users", "set-role", "alice", "operator", "-c", c).returncode == 0
    assert cli("users", "disable", "alice", "-c", c).returncode == 0
    new_password = "another long password"
    changed = cli("users", "set-password", "alice", "--password-stdin", "-c", c, stdin=new_password + "\n")
    assert changed.returncode == 0, changed.stderr
    listed = cli("users", "list", "-c", c)
    assert listed.returncode == 0
    (line,) = [row for row in listed.stdout.splitlines() if row.startswith("alice")]
    assert line.split()[1:3] == ["operator", "disabled"]
    missing = cli("users", "enable", "nobody", "-c", c)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no user 'nobody'"

    engine = make_engine(url)
    try:
        accounts = AccountRepository(engine, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
        accounts.update_user("alice", disabled=False)
        user = accounts.authenticate("alice", new_password)
        assert user is not None and user.role is Role.OPERATOR
        events = AuditLog(engine).list_events()
    finally:
        engine.dispose()
    # Every change is audited as the OS user, from "cli"; refused ones are not changes.
    assert [e.action for e in events] == ["user.update", "user.update", "user.update", "user.create"]
    assert all(e.actor.startswith("cli:") and e.source == "cli" for e in events)
    assert events[0].detail == {"password": "changed"}
    assert new_password not in str([e.detail for e in events])


def test_tokens(node: tuple[Path, str]) -> None:
    config, url = node
    c = str(config)
    engine = make_engine(url)
    try:
        AccountRepository(engine).create_user("sender", Role.OPERATOR, PASSWORD)
    finally:
        engine.dispose()

    created = cli(
        "tokens", "create", "--user", "sender", "--name", "modality stow", "--expires-days", "30", "-c", c
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("ainode_") and "\n" not in secret
    assert "will not be shown again" in created.stderr
    too_strong = cli("tokens", "create", "--user", "sender", "--name", "x", "--role", "admin", "-c", c)
    assert too_strong.returncode == 1 and "cannot have role admin" in too_strong.stderr

    listed = cli("tokens", "list", "-c", c)
    assert listed.returncode == 0 and secret[:14] in listed.stdout and secret not in listed.stdout
    assert "modality stow" in listed.stdout and "active" in listed.stdout

    engine = make_engine(url)
    try:
        accounts = AccountRepository(engine)
        found = accounts.authenticate_token(secret)
        assert found is not None and found[1].role is Role.OPERATOR and found[1].expires_at is not None
        token_id = found[1].id
        assert cli("tokens", "revoke", str(token_id), "-c", c).returncode == 0
        assert accounts.authenticate_token(secret) is None
        again = cli("tokens", "revoke", str(token_id), "-c", c)
        assert again.returncode == 1 and "already revoked" in again.stderr
        events = AuditLog(engine).list_events(action="token")
    finally:
        engine.dispose()
    assert [(e.action, e.target) for e in events] == [
        ("token.revoke", str(token_id)),
        ("token.create", str(token_id)),
    ]
    assert secret not in str([e.detail for e in events])


def test_rules_import_export_list_history(node: tuple[Path, str], tmp_path: Path) -> None:
    config, url = node
    c = str(config)
    imported = cli("rules", "import", str(RULES_YAML), "-m", "first import", "-c", c)
    assert imported.returncode == 0, imported.stderr
    assert "2 change(s), 0 rule(s) unchanged" in imported.stdout

    exported = tmp_path / "export.yaml"
    assert cli("rules", "export", "-o", str(exported), "-c", c).returncode == 0
    assert parse_rules(yaml.safe_load(exported.read_text())).rules == [
        r.model_copy(update={"version": 1}) for r in load_rules(RULES_YAML).rules
    ]

    # Change one rule, drop the other: only the changed one gets a version; --replace deletes the other.
    data = yaml.safe_load(exported.read_text())
    data["rules"] = [r for r in data["rules"] if r["id"] == "ct-chest-lungs"]
    data["rules"][0]["action"]["priority"] = 20
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    replaced = cli("rules", "import", str(edited), "--replace", "-m", "raise chest", "-c", c)
    assert replaced.returncode == 0, replaced.stderr
    assert "ct-chest-lungs: saved as version 2" in replaced.stdout
    assert "mr-brain-extraction: deleted as version 2" in replaced.stdout

    listed = cli("rules", "list", "-c", c)
    assert listed.returncode == 0
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("ct-chest-lungs", "2", "20")]

    history = cli("rules", "history", "ct-chest-lungs", "--diff", "-c", c)
    assert history.returncode == 0, history.stderr
    assert "raise chest" in history.stdout and "first import" in history.stdout
    assert "-  priority: 5" in history.stdout and "+  priority: 20" in history.stdout
    unknown = cli("rules", "history", "nope", "-c", c)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no rule 'nope'"

    engine = make_engine(url)
    try:
        events = AuditLog(engine).list_events(action="rule")
        current = RuleStore(engine)()
    finally:
        engine.dispose()
    assert [e.action for e in events] == ["rule.import", "rule.import"]
    assert events[0].detail["changes"] == [
        {"rule_id": "ct-chest-lungs", "version": 2, "change": "import"},
        {"rule_id": "mr-brain-extraction", "version": 2, "change": "delete"},
    ]
    assert [r.id for r in current.rules] == ["ct-chest-lungs"]


def test_rules_import_reports_field_errors_and_changes_nothing(
    node: tuple[Path, str], tmp_path: Path
) -> None:
    config, url = node
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n"
        "  - id: x\n"
        "    conditions: [{attribute: Modalty, equals: CT}]\n"
        "    action: {model: no-such-model, destinations: [pacs, mars]}\n"
    )
    result = cli("rules", "import", str(bad), "-c", str(config))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {bad}: rules[0].conditions[0].attribute: unknown attribute 'Modalty'")
    assert lines[1].startswith(f"error: {bad}: rules[0].action.model: unknown model 'no-such-model'")
    assert (
        lines[2] == f"error: {bad}: rules[0].action.destinations[1]: unknown destination 'mars'; known: pacs"
    )
    engine = make_engine(url)
    try:
        assert not RuleStore(engine).has_history()
    finally:
        engine.dispose()


def test_commands_refuse_a_missing_database(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path / 'none.db'}"}))
    result = cli("users", "list", "-c", str(config))
    assert result.returncode == 2 and "dicom-ai-node db upgrade" in result.stderr
    assert not (tmp_path / "none.db").exists()
