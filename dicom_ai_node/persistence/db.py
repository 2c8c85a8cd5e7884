"""Engine factory for the two supported databases (DESIGN.md, "Queue and persistence").

SQLite is the embedded default: WAL, synchronous=FULL (a commit survives power loss), a long busy timeout,
foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE``. Without the last one, the sqlite3
driver starts a deferred transaction that upgrades to a write lock on the first write and can fail at once
with "database is locked", ignoring the busy timeout; with it, writers queue up behind each other.

PostgreSQL is the scale-out engine (several receivers and workers); the psycopg 3 driver is used.

The schema is owned by the alembic migrations in ``persistence/migrations`` (revision 0001 is the schema
the node created before migrations existed). `upgrade_schema` brings a database to head; `check_schema`
only reads and raises `SchemaOutOfDateError` with one line saying what to run.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url

from dicom_ai_node.errors import ConfigError, DatabaseError, NodeError

# The engine type for annotations outside persistence/ (which does not import SQLAlchemy itself).
Engine: TypeAlias = sa.Engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
# UPDATE/INSERT ... RETURNING (used by the queue and repository) needs SQLite 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)
_URL_KEY = "database.url"

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BASELINE_REVISION = "0001"
# What `metadata.create_all` made before migrations existed; such a database is stamped as the baseline.
_BASELINE_TABLES = frozenset({"series", "instances", "jobs", "results"})
# Any constant; held for the length of an upgrade transaction so concurrent PostgreSQL upgrades queue.
_PG_UPGRADE_LOCK = 0x41494E4F4445
_UPGRADE_HINT = "run `dicom-ai-node db upgrade`"


class SchemaOutOfDateError(NodeError):
    """The database schema is not the one this version needs (or there is no database yet)."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: `current` is None for an empty database; `unversioned` marks a database
    created before migrations existed (tables but no alembic_version; it counts as the baseline)."""

    current: str | None
    head: str
    unversioned: bool = False

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head and not self.unversioned

    def describe(self) -> str:
        if self.current is None:
            return f"no database schema yet: {_UPGRADE_HINT}"
        was = " (created before migrations)" if self.unversioned else ""
        return (
            f"database schema is at {self.current}{was} but this version needs {self.head}: {_UPGRADE_HINT}"
        )


def make_engine(url: str) -> sa.Engine:
    """Create the engine for `url` (``sqlite:///path`` or ``postgresql[+psycopg]://...``).

    For SQLite the parent directory of the database file is created. In-memory SQLite is refused: the
    node only acknowledges what is durable, and an in-memory database is shared by no other connection.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(_URL_KEY, f"not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = _make_sqlite_engine(parsed)
    elif backend in ("postgresql", "postgres"):
        engine = _make_postgres_engine(parsed)
    else:
        raise ConfigError(_URL_KEY, f"unsupported database backend '{backend}' (use sqlite or postgresql)")
    event.listen(engine, "handle_error", _unavailable_as_database_error)
    return engine


def _unavailable_as_database_error(context: sa.engine.ExceptionContext) -> BaseException | None:
    """Raise `DatabaseError` where the driver says the database cannot be used right now.

    Only OperationalError / InterfaceError (connection refused or lost, locked, disk I/O error): other
    driver errors (IntegrityError, ProgrammingError) are either handled inside persistence/ or bugs, and
    stay as they are. SQLAlchemy still invalidates a dropped connection before raising this one.
    """
    if context.is_pre_ping:
        return None  # the pool's pre-ping reconnects on its own; its error must stay SQLAlchemy's
    if not isinstance(context.sqlalchemy_exception, sa.exc.OperationalError | sa.exc.InterfaceError):
        return None
    orig = context.original_exception
    lines = str(orig).strip().splitlines()
    return DatabaseError(f"database unavailable: {lines[0] if lines else type(orig).__name__}")


def create_schema(engine: sa.Engine) -> None:
    """Bring the schema to head through the migrations; idempotent (the name predates migrations)."""
    upgrade_schema(engine)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other engines), without creating anything."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(_URL_KEY, f"not a database URL: {exc}") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database).expanduser()


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    if head is None:  # only if the package lost its versions/ folder
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: sa.Engine) -> str | None:
    """The database's revision; an unversioned database with the baseline tables counts as the baseline."""
    return schema_state(engine).current


def schema_state(engine: sa.Engine) -> SchemaState:
    """Read where the database stands; creates and alters nothing."""
    with engine.connect() as conn:
        return _state(conn)


def check_schema(engine: sa.Engine) -> SchemaState:
    """Raise SchemaOutOfDateError (one line, what to run) unless the schema is at head; changes nothing."""
    state = schema_state(engine)
    if not state.up_to_date:
        raise SchemaOutOfDateError(state.describe())
    return state


def upgrade_schema(engine: sa.Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade to `revision` (default: this version's head) in one transaction; returns (revision before,
    revision after).

    Several processes may call this at once: SQLite's BEGIN IMMEDIATE and a PostgreSQL advisory lock
    make them take turns, and a later one finds nothing left to do.
    """
    with _migration_connection(engine) as conn:
        state = _state(conn)
        target = state.head if revision == "head" else revision
        if state.current == target and not state.unversioned:
            return state.current, target
        cfg = _alembic_config(conn)
        with _quiet_alembic():
            if state.unversioned:
                command.stamp(cfg, BASELINE_REVISION)
            if state.current != target:
                command.upgrade(cfg, target)
        return state.current, target


def downgrade_schema(engine: sa.Engine, revision: str) -> None:
    """Downgrade to `revision` (tests and emergencies; data in dropped tables and columns is lost)."""
    with _migration_connection(engine) as conn, _quiet_alembic():
        command.downgrade(_alembic_config(conn), revision)


@contextmanager
def _migration_connection(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.begin() as conn:
        if is_postgres(engine):
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_UPGRADE_LOCK)))
        yield conn


def _alembic_config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _state(conn: sa.Connection) -> SchemaState:
    head = head_revision()
    current = MigrationContext.configure(conn).get_current_revision()
    if current is not None:
        try:
            _scripts().get_revision(current)
        except CommandError:
            raise SchemaOutOfDateError(
                f"database schema is at {current}, which this version does not know "
                f"(written by a newer dicom-ai-node?); this version needs {head}"
            ) from None
        return SchemaState(current, head)
    tables = set(sa.inspect(conn).get_table_names())
    if _BASELINE_TABLES <= tables:
        return SchemaState(BASELINE_REVISION, head, unversioned=True)
    if tables & _BASELINE_TABLES:
        missing = ", ".join(sorted(_BASELINE_TABLES - tables))
        raise SchemaOutOfDateError(
            f"database has some of the node's tables but not {missing}: not upgradable"
        )
    return SchemaState(None, head)


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    # Alembic logs each step at INFO; the caller logs one line for the whole upgrade instead.
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_postgres(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"


def is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _make_sqlite_engine(parsed: URL) -> sa.Engine:
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(_URL_KEY, f"unsupported SQLite driver '{parsed.drivername}' (use sqlite:///path)")
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ConfigError(_URL_KEY, "SQLite needs a database file path (sqlite:///path/to/node.db)")
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ConfigError(
            _URL_KEY,
            f"SQLite {sqlite3.sqlite_version} is too old; {'.'.join(map(str, MIN_SQLITE_VERSION))} needed",
        )
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        parsed,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver so that _on_begin decides how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            _enable_wal(cursor)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch the database to WAL (a setting stored in the file, so normally once, by its first user).

    The switch needs the database to itself, and SQLite answers "database is locked" at once, without
    waiting out the busy timeout, while another connection is inside a transaction. That only happens
    when several processes open a brand-new database together (serve and worker starting at once), so
    the switch is retried until the busy timeout is used up.
    """
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            # SQLite may also decline quietly, answering with the mode it kept.
            if str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal":
                return
            problem = "journal mode not switched to WAL"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            problem = str(exc)
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"cannot switch the database to WAL: {problem}")
        time.sleep(0.05)


def _make_postgres_engine(parsed: URL) -> sa.Engine:
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername != "postgresql+psycopg":
        raise ConfigError(
            _URL_KEY, f"unsupported PostgreSQL driver '{parsed.drivername}' (use postgresql+psycopg)"
        )
    return sa.create_engine(parsed, pool_pre_ping=True)
