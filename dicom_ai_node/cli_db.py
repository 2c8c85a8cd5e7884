"""`dicom-ai-node db ...`: the database schema (alembic migrations; see persistence/db.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from dicom_ai_node.persistence.db import Engine

db_app = typer.Typer(help="The database schema (migrations).", no_args_is_help=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="node.yaml (default: $AINODE_CONFIG or config/node.yaml if present)"),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _engine(config: Path | None, *, create: bool) -> Engine:
    from dicom_ai_node.cli import _settings
    from dicom_ai_node.persistence.db import make_engine, sqlite_path

    url = _settings(config).database_url
    path = sqlite_path(url)
    if not create and path is not None and not path.exists():
        # A read-only command must not leave an empty database file behind.
        raise _fail(f"no database at {path}: run `dicom-ai-node db upgrade`")
    return make_engine(url)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Bring the database schema to this version's head (creates the database's tables when empty)."""
    from dicom_ai_node.errors import NodeError
    from dicom_ai_node.persistence.db import upgrade_schema

    engine = _engine(config, create=True)
    try:
        before, after = upgrade_schema(engine)
    except NodeError as exc:  # DatabaseError included: its message says what the driver said
        raise _fail(str(exc)) from exc
    finally:
        engine.dispose()
    if before == after:
        typer.echo(f"database schema is up to date ({after})")
    else:
        typer.echo(f"database schema upgraded {before or 'empty'} -> {after}")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Show the database's schema revision and this version's head; exit 1 when the database is behind."""
    from dicom_ai_node.errors import NodeError
    from dicom_ai_node.persistence.db import schema_state

    engine = _engine(config, create=False)
    try:
        state = schema_state(engine)
    except NodeError as exc:  # DatabaseError included: its message says what the driver said
        raise _fail(str(exc)) from exc
    finally:
        engine.dispose()
    note = " (created before migrations; not stamped yet)" if state.unversioned else ""
    typer.echo(f"current: {state.current or 'none (empty database)'}{note}")
    typer.echo(f"head:    {state.head}")
    if state.up_to_date:
        typer.echo("up to date")
        return
    typer.echo("behind: run `dicom-ai-node db upgrade`")
    raise typer.Exit(1)
