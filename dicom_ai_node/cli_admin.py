"""`dicom-ai-node users|tokens ...` and the database-backed `rules import|export|list|history` commands.

The command line is the way in when nobody can sign in yet (there is no default account) and the
recovery path when every admin is locked out. Every change it makes is audited with actor
"cli:<os user>" and source "cli". Commands open the database in "check" mode: they never create or
migrate it (`dicom-ai-node db upgrade` does).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from dicom_ai_node.domain.auth import Role

if TYPE_CHECKING:
    from dicom_ai_node.config import NodeSettings
    from dicom_ai_node.node import Services
    from dicom_ai_node.persistence.accounts import AccountRepository, ApiToken, User
    from dicom_ai_node.persistence.audit import AuditLog
    from dicom_ai_node.persistence.db import Engine
    from dicom_ai_node.persistence.rules_store import RuleVersion

users_app = typer.Typer(help="Users of the admin page and API.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens for scripts and STOW-RS senders.", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="node.yaml (default: $AINODE_CONFIG or config/node.yaml if present)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input")
]
SOURCE = "cli"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_actor() -> str:
    """The audit actor of a command-line change: the operating-system account that ran it."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        name = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"cli:{name}"


def _settings(config: Path | None) -> NodeSettings:
    # Imported here: cli.py imports this module to register its commands.
    from dicom_ai_node.cli import _settings as load

    return load(config)


def _check_engine(settings: NodeSettings) -> Engine:
    """The node's database, only if its schema is current; never creates the file or alters tables."""
    from dicom_ai_node.persistence.db import SchemaOutOfDateError, check_schema, make_engine, sqlite_path

    path = sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        _fail(f"no database at {path}: run `dicom-ai-node db upgrade`", 2)
    engine = make_engine(settings.database_url)
    try:
        check_schema(engine)
    except SchemaOutOfDateError as exc:
        engine.dispose()
        _fail(str(exc), 2)
    return engine


@contextmanager
def _database_errors() -> Iterator[None]:
    from dicom_ai_node.errors import DatabaseError

    try:
        yield
    except DatabaseError as exc:
        _fail(str(exc))


@dataclass
class _Accounts:
    accounts: AccountRepository
    audit: AuditLog

    def record(self, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        self.audit.record(actor=cli_actor(), source=SOURCE, action=action, target=target, detail=detail)


@contextmanager
def _open_accounts(config: Path | None) -> Iterator[_Accounts]:
    from dicom_ai_node.errors import AccountError
    from dicom_ai_node.persistence.accounts import AccountRepository
    from dicom_ai_node.persistence.audit import AuditLog

    engine = _check_engine(_settings(config))
    try:
        with _database_errors():
            yield _Accounts(AccountRepository(engine), AuditLog(engine))
    except AccountError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()


def _read_password(username: str, from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            _fail("--password-stdin: standard input is empty")
        return line.rstrip("\r\n")
    return str(typer.prompt(f"Password for {username}", hide_input=True, confirmation_prompt=True))


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- users -------------------------------------------------------------------------------------------


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="User name (letters, digits, _ . @ -)")],
    role: Annotated[Role, typer.Option(help="What the user may do")],
    password_stdin: PasswordStdinOption = False,
    config: ConfigOption = None,
) -> None:
    """Add a user; the password is asked twice (hidden) unless --password-stdin is given."""
    from dicom_ai_node.persistence.accounts import check_password, check_username

    with _open_accounts(config) as db:
        check_username(username)
        password = _read_password(username, password_stdin)
        check_password(username, password)
        user = db.accounts.create_user(username, role, password)
        db.record("user.create", user.username, {"role": user.role.value})
    typer.echo(f"user {user.username} added ({user.role.value})")


@users_app.command("list")
def users_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every user with role, state and last sign-in."""
    with _open_accounts(config) as db:
        users = db.accounts.list_users()
    if as_json:
        typer.echo(json.dumps([_user_json(u) for u in users], indent=2))
        return
    typer.echo(f"{'USER':24} {'ROLE':9} {'STATE':9} {'CREATED':20} LAST SIGN-IN")
    for u in users:
        state = "disabled" if u.disabled else "enabled"
        typer.echo(
            f"{u.username:24} {u.role.value:9} {state:9} {_when(u.created_at):20} {_when(u.last_login_at)}"
        )


def _user_json(u: User) -> dict[str, Any]:
    return {
        "username": u.username,
        "role": u.role.value,
        "disabled": u.disabled,
        "created_at": _iso(u.created_at),
        "last_login_at": _iso(u.last_login_at),
    }


@users_app.command("set-role")
def users_set_role(
    username: str,
    role: Annotated[Role, typer.Argument(help="admin | operator | viewer | sender")],
    config: ConfigOption = None,
) -> None:
    """Change a user's role (applies to its sessions and tokens at once)."""
    with _open_accounts(config) as db:
        user = db.accounts.update_user(username, role=role)
        db.record("user.update", username, {"role": user.role.value})
    typer.echo(f"user {username} is now {user.role.value}")


@users_app.command("disable")
def users_disable(username: str, config: ConfigOption = None) -> None:
    """Disable a user: signs it out everywhere and stops its API tokens."""
    with _open_accounts(config) as db:
        db.accounts.update_user(username, disabled=True)
        db.record("user.update", username, {"disabled": True})
    typer.echo(f"user {username} disabled")


@users_app.command("enable")
def users_enable(username: str, config: ConfigOption = None) -> None:
    """Enable a disabled user again."""
    with _open_accounts(config) as db:
        db.accounts.update_user(username, disabled=False)
        db.record("user.update", username, {"disabled": False})
    typer.echo(f"user {username} enabled")


@users_app.command("set-password")
def users_set_password(
    username: str, password_stdin: PasswordStdinOption = False, config: ConfigOption = None
) -> None:
    """Set a user's password (signs it out everywhere)."""
    from dicom_ai_node.persistence.accounts import check_password

    with _open_accounts(config) as db:
        if db.accounts.get_user(username) is None:
            _fail(f"no user '{username}'")
        password = _read_password(username, password_stdin)
        check_password(username, password)
        db.accounts.update_user(username, password=password)
        # Never the password, nor its hash: only that it changed.
        db.record("user.update", username, {"password": "changed"})
    typer.echo(f"password of {username} changed; its sessions were signed out")


# -- API tokens --------------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Option("--user", help="The user the token acts for")],
    name: Annotated[str, typer.Option("--name", help="A label: what or who uses the token")],
    role: Annotated[Role | None, typer.Option(help="Token role (default and maximum: the user's)")] = None,
    expires_days: Annotated[
        float | None, typer.Option("--expires-days", min=0.001, help="Expire after N days (default: never)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API token. The secret is printed once, alone on standard output (for scripts)."""
    from dicom_ai_node.domain.clock import utcnow

    expires_at = utcnow() + timedelta(days=expires_days) if expires_days is not None else None
    with _open_accounts(config) as db:
        secret, token = db.accounts.create_token(user, name, role=role, expires_at=expires_at)
        detail: dict[str, Any] = {"name": token.name, "user": token.username, "role": token.role.value}
        if token.expires_at is not None:
            detail["expires_at"] = token.expires_at.isoformat()
        db.record("token.create", str(token.id), detail)
    expiry = f"expires {_when(token.expires_at)} UTC" if token.expires_at else "never expires"
    typer.echo(
        f"token {token.id} '{token.name}' for {token.username} ({token.role.value}), {expiry}:", err=True
    )
    typer.echo(secret)
    typer.echo(
        "This secret will not be shown again; store it now (send it as 'Authorization: Bearer ...').",
        err=True,
    )


@tokens_app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tokens")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """API tokens (never their secrets): prefix, role, expiry, last use, revocation."""
    with _open_accounts(config) as db:
        tokens = db.accounts.list_tokens(user)
    if as_json:
        typer.echo(json.dumps([_token_json(t) for t in tokens], indent=2))
        return
    typer.echo(
        f"{'ID':>4} {'NAME':20} {'USER':16} {'ROLE':9} {'PREFIX':15} {'EXPIRES':20} {'LAST USED':20} STATE"
    )
    for t in tokens:
        state = f"revoked {_when(t.revoked_at)}" if t.revoked_at else "active"
        typer.echo(
            f"{t.id:>4} {t.name[:20]:20} {t.username[:16]:16} {t.role.value:9} {t.token_prefix:15} "
            f"{_when(t.expires_at):20} {_when(t.last_used_at):20} {state}"
        )


def _token_json(t: ApiToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "username": t.username,
        "role": t.role.value,
        "token_prefix": t.token_prefix,
        "created_at": _iso(t.created_at),
        "expires_at": _iso(t.expires_at),
        "last_used_at": _iso(t.last_used_at),
        "revoked_at": _iso(t.revoked_at),
    }


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(help="Token id (see `tokens list`)")], config: ConfigOption = None
) -> None:
    """Revoke a token for good."""
    with _open_accounts(config) as db:
        token = db.accounts.get_token(token_id)
        if token is None:
            _fail(f"no token {token_id}")
        if not db.accounts.revoke_token(token_id):
            _fail(f"token {token_id} is already revoked")
        db.record("token.revoke", str(token_id), {"name": token.name, "user": token.username})
    typer.echo(f"token {token_id} '{token.name}' revoked")


# -- rules in the database ---------------------------------------------------------------------------


@contextmanager
def _open_services(config: Path | None) -> Iterator[Services]:
    from dicom_ai_node.errors import RuleConflictError, RuleError
    from dicom_ai_node.node import build_services
    from dicom_ai_node.persistence.db import SchemaOutOfDateError

    settings = _settings(config)
    try:
        services = build_services(settings, migrate="check")
    except SchemaOutOfDateError as exc:
        _fail(str(exc), 2)
    try:
        with _database_errors():
            yield services
    except (RuleConflictError, RuleError) as exc:
        _fail(str(exc))
    finally:
        if services.engine is not None:
            services.engine.dispose()


def _loc_text(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(file)"


def rules_import(
    file: Annotated[Path, typer.Argument(help="rules.yaml to import")],
    replace: Annotated[bool, typer.Option("--replace", help="Delete rules that are not in the file")] = False,
    comment: Annotated[str, typer.Option("--comment", "-m", help="Why (kept in each rule's history)")] = "",
    config: ConfigOption = None,
) -> None:
    """Import a rules file: each changed or new rule gets a new version; unchanged rules are left alone."""
    import yaml

    from dicom_ai_node.domain.rules import parse_rules, ruleset_field_errors
    from dicom_ai_node.persistence.audit import AuditLog

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read rules file {file}: {exc.strerror}")
    except yaml.YAMLError as exc:
        _fail(f"{file} is not valid YAML: {exc}")
    with _open_services(config) as services:
        destinations = [d.name for d in services.settings.destinations]
        errors = ruleset_field_errors(data, services.registry.names(), destinations)
        for err in errors:
            typer.echo(f"error: {file}: {_loc_text(err.loc)}: {err.msg}", err=True)
        if errors:
            raise typer.Exit(1)
        ruleset = parse_rules(data, str(file))
        written = services.rules.import_ruleset(ruleset, actor=cli_actor(), comment=comment, replace=replace)
        if written:
            changes = [{"rule_id": v.rule_id, "version": v.version, "change": v.change} for v in written]
            detail = {"file": file.name, "replace": replace, "comment": comment, "changes": changes}
            AuditLog(services.engine).record(
                actor=cli_actor(), source=SOURCE, action="rule.import", target=file.name, detail=detail
            )
    for v in written:
        what = "deleted" if v.deleted else "saved"
        typer.echo(f"{v.rule_id}: {what} as version {v.version}")
    unchanged = len(ruleset.rules) - sum(1 for v in written if not v.deleted)
    typer.echo(f"{file}: {len(written)} change(s), {unchanged} rule(s) unchanged")


def rules_export(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write the current rules as a rules file (the format `rules import` and `rules validate` read)."""
    from dicom_ai_node.domain.rules import ruleset_to_yaml

    with _open_services(config) as services:
        ruleset = services.rules.export()
    text = ruleset_to_yaml(ruleset)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    typer.echo(f"wrote {len(ruleset.rules)} rules to {output}", err=True)


def rules_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The current rules in the order routing sees them (priority first)."""
    with _open_services(config) as services:
        current = services.rules.list_current()
    if as_json:
        typer.echo(json.dumps([_version_json(v) for v in current], indent=2))
        return
    typer.echo(
        f"{'ID':28} {'VER':>4} {'ON':3} {'PRIO':>4} {'MODEL':20} {'DESTINATIONS':16} {'UPDATED':20} BY"
    )
    for v in current:
        r = v.rule
        typer.echo(
            f"{r.id:28} {v.version:>4} {'yes' if r.enabled else 'no':3} {r.action.priority:>4} "
            f"{r.action.model:20} {','.join(r.action.destinations):16} {_when(v.created_at):20} {v.created_by}"
        )


def rules_history(
    rule_id: Annotated[str, typer.Argument(help="Rule id")],
    diff: Annotated[bool, typer.Option("--diff", help="Show what each version changed")] = False,
    config: ConfigOption = None,
) -> None:
    """Every version of a rule, newest first: who, when, what kind of change, and why."""
    from dicom_ai_node.domain.rules import rule_diff

    with _open_services(config) as services:
        history = services.rules.history(rule_id)
    if not history:
        _fail(f"no rule '{rule_id}'")
    typer.echo(f"{'VER':>4} {'CHANGE':9} {'WHEN':20} {'BY':20} COMMENT")
    for i, v in enumerate(history):
        typer.echo(f"{v.version:>4} {v.change:9} {_when(v.created_at):20} {v.created_by[:20]:20} {v.comment}")
        if diff:
            older = history[i + 1] if i + 1 < len(history) else None
            old_rule = older.rule if older is not None and not older.deleted else None
            new_rule = None if v.deleted else v.rule
            old_label = f"{rule_id} v{older.version}" if older is not None else "(none)"
            new_label = f"{rule_id} v{v.version}" + (" (deleted)" if v.deleted else "")
            text = rule_diff(old_rule, new_rule, old_label, new_label)
            if text:
                typer.echo(text.rstrip("\n"))


def _version_json(v: RuleVersion) -> dict[str, Any]:
    return {
        "rule": v.rule.model_dump(mode="json", by_alias=True, exclude_none=True),
        "version": v.version,
        "change": v.change,
        "comment": v.comment,
        "updated_by": v.created_by,
        "updated_at": _iso(v.created_at),
    }


def register_rules_commands(rules_app: typer.Typer) -> None:
    """Add import, export, list and history to the `rules` command group."""
    rules_app.command("import")(rules_import)
    rules_app.command("export")(rules_export)
    rules_app.command("list")(rules_list)
    rules_app.command("history")(rules_history)
