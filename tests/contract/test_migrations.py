"""Schema migrations on SQLite and PostgreSQL: models and migrations agree (drift), data survives an
upgrade from the baseline, downgrade and upgrade again, audit_events is append-only, and read-only
("check") start-up neither creates nor alters anything."""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.payloads import DeliverPayload, InferPayload, PayloadError, parse_payload
from dicom_ai_node.persistence.db import (
    SchemaOutOfDateError,
    check_schema,
    current_revision,
    downgrade_schema,
    head_revision,
    make_engine,
    schema_state,
    upgrade_schema,
)
from dicom_ai_node.persistence.queue import JobFilter, JobQueue
from dicom_ai_node.persistence.tables import metadata
from tests.conftest import _admin_engine, _require_postgres

BASELINE_TABLES = ("series", "instances", "jobs", "results")
NEW_TABLES = ("users", "sessions", "api_tokens", "audit_events", "rules", "rule_versions")
NEW_JOB_COLUMNS = ("series_instance_uid", "rule_id", "model", "destination")
# Added by 0003 (completion signal).
NEW_SERIES_COLUMNS = ("complete_signalled_at",)
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

NewDatabase = Callable[[], str]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewDatabase]:
    """Makes URLs of new, empty databases (a SQLite file not yet created, or a new PostgreSQL database)."""
    created: list[str] = []
    admin = _admin_engine() if request.param == "postgresql" else None
    if admin is not None:
        _require_postgres(admin)

    def make() -> str:
        name = f"ainode_mig_{secrets.token_hex(6)}"
        if admin is None:
            return f"sqlite:///{tmp_path / name / 'node.db'}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    yield make
    if admin is not None:
        with admin.connect() as conn:
            for name in created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def fresh(new_database: NewDatabase) -> Iterator[sa.Engine]:
    engine = make_engine(new_database())
    try:
        yield engine
    finally:
        engine.dispose()


# -- schema snapshots -----------------------------------------------------------------------------------


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Everything about the schema that matters, straight from the catalog (columns with types, nullability
    and defaults; indexes with their WHERE clause; constraints; triggers), minus alembic's own table."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return _sqlite_snapshot(conn)
        return _postgres_snapshot(conn)


def _sqlite_snapshot(conn: sa.Connection) -> dict[str, Any]:
    names = conn.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "AND name != 'alembic_version' ORDER BY name"
    ).scalars()
    tables: dict[str, Any] = {}
    for name in list(names):
        indexes = {}
        for idx in conn.exec_driver_sql(f"PRAGMA index_list('{name}')").mappings():
            columns = [
                r["name"] for r in conn.exec_driver_sql(f"PRAGMA index_info('{idx['name']}')").mappings()
            ]
            sql = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (idx["name"],)
            ).scalar()
            # Automatic indexes (unique constraints) are numbered by position; key them by their columns.
            key = idx["name"] if sql else f"auto:{','.join(columns)}"
            indexes[key] = (idx["unique"], idx["origin"], idx["partial"], columns, sql)
        tables[name] = {
            "columns": [tuple(r) for r in conn.exec_driver_sql(f"PRAGMA table_info('{name}')")],
            "indexes": indexes,
            "fks": sorted(tuple(r)[2:] for r in conn.exec_driver_sql(f"PRAGMA foreign_key_list('{name}')")),
        }
    triggers = conn.exec_driver_sql(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
    ).all()
    return {"tables": tables, "triggers": [tuple(t) for t in triggers]}


def _postgres_snapshot(conn: sa.Connection) -> dict[str, Any]:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]

    return {
        "columns": rows(
            "SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length, "
            "is_nullable, column_default FROM information_schema.columns WHERE table_schema = 'public' "
            "AND table_name != 'alembic_version' ORDER BY 1, 3"
        ),
        "indexes": rows(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
            "AND tablename != 'alembic_version' ORDER BY 1"
        ),
        "constraints": rows(
            "SELECT conname, conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text != 'alembic_version' "
            "ORDER BY 1"
        ),
        "triggers": rows(
            "SELECT tgname, tgrelid::regclass::text, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE NOT tgisinternal ORDER BY 1"
        ),
        "functions": rows(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
        ),
    }


def _without_triggers(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if k not in ("triggers", "functions")}


def _compare_server_default(
    _context: MigrationContext,
    _inspected_column: Any,
    metadata_column: sa.Column[Any],
    inspected_default: str | None,
    _metadata_default: Any,
    _rendered_metadata_default: str | None,
) -> bool | None:
    # Alembic's SQLite comparison reports every DEFAULT '' as changed: the reflected default arrives as
    # "('')" (alembic adds the parentheses) and its comparison of that to the metadata's '' fails. The
    # catalog comparison in test_migrations_and_models_agree checks these defaults for real (PRAGMA
    # table_info's dflt_value), so here only exactly that case counts as equal; everything else is left to
    # alembic (None).
    default = metadata_column.server_default
    if (
        inspected_default in ("''", "('')")
        and isinstance(default, sa.DefaultClause)
        and isinstance(default.arg, str)
        and default.arg == ""
    ):
        return False
    return None


# -- drift ------------------------------------------------------------------------------------------------


def test_migrations_and_models_agree(new_database: NewDatabase) -> None:
    migrated = make_engine(new_database())
    modelled = make_engine(new_database())
    try:
        assert upgrade_schema(migrated) == (None, head_revision())
        with migrated.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": _compare_server_default}
            )
            # Types, nullability, server defaults, tables, columns, indexes, unique constraints, foreign keys.
            assert compare_metadata(context, metadata) == []
        # compare_metadata does not look at a partial index's WHERE clause (uq_jobs_running_lock_key) or
        # at anything outside the metadata; the catalogs of a migrated database and of one made by
        # create_all from the models must match too (triggers exist only in the migrated one).
        metadata.create_all(modelled)
        migrated_snap, modelled_snap = snapshot(migrated), snapshot(modelled)
        if migrated.dialect.name == "sqlite":
            # Columns added by ALTER TABLE are spelled differently in sqlite_master; the PRAGMA rows compared
            # here carry the same facts.
            assert migrated_snap["tables"] == modelled_snap["tables"]
        else:
            assert _without_triggers(migrated_snap) == _without_triggers(modelled_snap)
        assert any(
            "uq_jobs_running_lock_key" in str(v) and "running" in str(v) for v in _flatten(migrated_snap)
        )
    finally:
        migrated.dispose()
        modelled.dispose()


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def test_upgrade_is_idempotent_and_reports_the_revisions(fresh: sa.Engine) -> None:
    assert current_revision(fresh) is None
    assert upgrade_schema(fresh, "0001") == (None, "0001")
    assert current_revision(fresh) == "0001"
    assert upgrade_schema(fresh) == ("0001", head_revision())
    assert upgrade_schema(fresh) == (head_revision(), head_revision())
    assert check_schema(fresh).up_to_date


def test_concurrent_upgrades_take_turns(new_database: NewDatabase) -> None:
    url = new_database()
    engines = [make_engine(url) for _ in range(3)]
    barrier = threading.Barrier(len(engines))
    outcomes: list[object] = []

    def upgrade(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            outcomes.append(upgrade_schema(engine))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=upgrade, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        head = head_revision()
        assert sorted(outcomes, key=str) == sorted([(None, head), (head, head), (head, head)], key=str)
    finally:
        for e in engines:
            e.dispose()


# -- data survives ------------------------------------------------------------------------------------------


def _fill_baseline(engine: sa.Engine, n_bulk_jobs: int = 1203) -> None:
    """Rows as the node wrote them before migrations: two series, instances, infer + deliver jobs with
    payloads (plus odd ones: no payload keys, a JSON list), results; more jobs than one backfill batch."""
    md = sa.MetaData()
    series, instances, jobs, results = (sa.Table(n, md, autoload_with=engine) for n in BASELINE_TABLES)
    assert not set(NEW_JOB_COLUMNS) & set(jobs.c.keys())
    s1, s2 = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
    with engine.begin() as conn:
        for uid, modality, status in ((s1, "CT", "routed"), (s2, "MR", "receiving")):
            conn.execute(
                sa.insert(series).values(
                    series_instance_uid=uid,
                    study_instance_uid="1.2.3.study",
                    modality=modality,
                    body_part_examined="CHEST",
                    series_description="Thorax 1.0",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    calling_ae="MODALITY",
                    instance_count=2,
                    first_received_at=T0,
                    last_received_at=T0 + timedelta(seconds=3, microseconds=7),
                    status=status,
                    generation=1,
                    routing_started_at=T0 + timedelta(seconds=9) if status == "routed" else None,
                    routed_at=T0 + timedelta(seconds=10) if status == "routed" else None,
                    route_note="routed by chest-ct v3" if status == "routed" else "",
                    header_json=json.dumps({"SliceThickness": "1.0", "Rows": 512}),
                )
            )
            for i in range(2):
                conn.execute(
                    sa.insert(instances).values(
                        sop_instance_uid=f"{uid}.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        series_instance_uid=uid,
                        study_instance_uid="1.2.3.study",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        spool_path=f"ab/{uid}-{i}.dcm",
                        size_bytes=2**33 + i,  # BigInteger
                        calling_ae="MODALITY",
                        received_at=T0 + timedelta(microseconds=i),
                    )
                )
        common = {"scheduled_at": T0, "created_at": T0, "updated_at": T0, "max_attempts": 8}
        infer_payload = {
            "series_instance_uid": s1,
            "study_instance_uid": "1.2.3.study",
            "generation": 1,
            "rule_id": "chest-ct",
            "rule_version": 3,
            "model": "lung-seg",
            "destinations": ["pacs", "archive"],
        }
        conn.execute(
            sa.insert(jobs).values(
                id=1,
                kind="infer",
                status="succeeded",
                payload=json.dumps(infer_payload, sort_keys=True),
                priority=5,
                attempts=1,
                dedupe_key="infer:s1:1:chest-ct:3",
                lock_key=f"series:{s1}",
                started_at=T0,
                finished_at=T0 + timedelta(seconds=20),
                result=json.dumps({"timings": {"infer_s": 1.5}}),
                **common,
            )
        )
        for job_id, destination, status in ((2, "pacs", "dead"), (3, "archive", "running")):
            payload = {
                "destination": destination,
                "files": ["x/seg.dcm"],
                "fallback_files": [],
                "series_instance_uid": s1,
                "infer_job_id": 1,
            }
            conn.execute(
                sa.insert(jobs).values(
                    id=job_id,
                    kind="deliver",
                    status=status,
                    payload=json.dumps(payload, sort_keys=True),
                    attempts=3,
                    lock_key="study:1.2.3.study",
                    worker_id="host:1" if status == "running" else None,
                    heartbeat_at=T0 if status == "running" else None,
                    last_error="PermanentDeliveryError: association rejected" if status == "dead" else None,
                    **common,
                )
            )
        conn.execute(sa.insert(jobs).values(id=4, kind="deliver", status="queued", payload="{}", **common))
        conn.execute(sa.insert(jobs).values(id=5, kind="infer", status="queued", payload="[1, 2]", **common))
        bulk = [
            {
                "id": 100 + i,
                "kind": "infer",
                "status": "queued",
                "payload": json.dumps({"series_instance_uid": s2, "model": f"m{i}", "rule_id": "mr"}),
                **common,
            }
            for i in range(n_bulk_jobs)
        ]
        if bulk:
            conn.execute(sa.insert(jobs), bulk)
        for i, kind in enumerate(("seg", "sr")):
            conn.execute(
                sa.insert(results).values(
                    job_id=1,
                    source_series_instance_uid=s1,
                    kind=kind,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                    sop_instance_uid=f"2.25.{i}",
                    series_instance_uid=f"2.25.9{i}",
                    study_instance_uid="1.2.3.study",
                    spool_path=f"results/{i}.dcm",
                    created_at=T0,
                )
            )
    if engine.dialect.name == "postgresql":
        # Explicit ids do not move PostgreSQL's sequences; the node never inserts ids itself.
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT setval('jobs_id_seq', (SELECT max(id) FROM jobs))"))


def _baseline_rows(engine: sa.Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of the baseline tables, baseline columns only (read through the current models, so
    the values are typed: aware datetimes, ints)."""
    from dicom_ai_node.persistence import tables

    old = {
        name: [
            c
            for c in getattr(tables, name).c
            if c.name not in (NEW_SERIES_COLUMNS if name == "series" else NEW_JOB_COLUMNS)
        ]
        for name in BASELINE_TABLES
    }
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for name, columns in old.items():
            pk = list(getattr(tables, name).primary_key.columns)
            out[name] = [dict(r) for r in conn.execute(sa.select(*columns).order_by(*pk)).mappings()]
    return out


@pytest.mark.parametrize("how", ["stamped", "created-before-migrations"])
def test_a_baseline_database_upgrades_with_nothing_lost(fresh: sa.Engine, how: str) -> None:
    upgrade_schema(fresh, "0001")
    if how == "created-before-migrations":
        # What create_all of the pre-migration node left (the same DDL as 0001, no alembic_version).
        with fresh.begin() as conn:
            conn.execute(sa.text("DROP TABLE alembic_version"))
        state = schema_state(fresh)
        assert (state.current, state.unversioned) == ("0001", True)
    _fill_baseline(fresh)
    before = _baseline_rows(fresh)
    assert len(before["jobs"]) == 5 + 1203 and before["series"][0]["first_received_at"] == T0

    assert upgrade_schema(fresh) == ("0001", head_revision())

    assert _baseline_rows(fresh) == before
    names = set(sa.inspect(fresh).get_table_names())
    assert set(NEW_TABLES) <= names
    queue = JobQueue(fresh)
    infer, dead, running, empty, odd = (queue.get(i) for i in range(1, 6))
    assert (
        infer is not None
        and dead is not None
        and running is not None
        and empty is not None
        and odd is not None
    )
    s1 = infer.payload["series_instance_uid"]
    assert (infer.series_instance_uid, infer.rule_id, infer.model, infer.destination) == (
        s1,
        "chest-ct",
        "lung-seg",
        None,  # an infer job has destinations (a list), not one destination
    )
    assert (dead.series_instance_uid, dead.destination, dead.model) == (s1, "pacs", None)
    assert running.destination == "archive" and running.status.value == "running"
    assert (empty.series_instance_uid, empty.rule_id, empty.model, empty.destination) == (None,) * 4
    assert odd.payload == {"value": [1, 2]} and odd.model is None
    # The payloads the node wrote before they had a version read as version 1 (what a worker claiming
    # them parses); the odd ones name what is wrong.
    parsed = parse_payload(infer.kind, infer.payload)
    assert isinstance(parsed, InferPayload) and (parsed.version, parsed.rule_version) == (1, 3)
    assert parsed.destinations == ["pacs", "archive"]
    for deliver in (dead, running):
        parsed_deliver = parse_payload(deliver.kind, deliver.payload)
        assert isinstance(parsed_deliver, DeliverPayload) and parsed_deliver.infer_job_id == 1
    with pytest.raises(
        PayloadError, match=r"payload of deliver job 4 does not validate: destination: Field required"
    ):
        parse_payload(empty.kind, empty.payload, job_id=empty.id)
    bulk = queue.get(100 + 1202)
    assert bulk is not None and (bulk.model, bulk.rule_id) == ("m1202", "mr")
    # The filters see migrated jobs, and the queue keeps working on the migrated schema.
    assert queue.count_jobs(JobFilter(rule_id="mr")) == 1203
    assert [j.id for j in queue.children(1)] == [2, 3]
    assert queue.count_jobs(JobFilter(modality="CT")) == 3
    new_id = queue.enqueue(
        JobKind.DELIVER, {"destination": "pacs", "files": [], "series_instance_uid": s1, "infer_job_id": 1}
    )
    assert new_id > 100 + 1202 and [j.id for j in queue.children(1)] == [2, 3, new_id]


def test_downgrade_to_the_baseline_and_up_again(fresh: sa.Engine) -> None:
    upgrade_schema(fresh, "0001")
    _fill_baseline(fresh, n_bulk_jobs=3)
    before = _baseline_rows(fresh)
    at_baseline = snapshot(fresh)
    upgrade_schema(fresh)
    with fresh.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_events (at, actor, source, action, outcome) VALUES (:at, 'a', 'cli', 'x', 'ok')"
            ),
            {"at": T0.replace(tzinfo=None)},
        )

    downgrade_schema(fresh, "0001")
    assert current_revision(fresh) == "0001"
    assert snapshot(fresh) == at_baseline  # tables, columns, index and triggers gone again
    assert _baseline_rows(fresh) == before

    assert upgrade_schema(fresh) == ("0001", head_revision())
    assert _baseline_rows(fresh) == before
    job = JobQueue(fresh).get(1)
    assert job is not None and job.model == "lung-seg"


def test_audit_events_are_append_only(fresh: sa.Engine) -> None:
    upgrade_schema(fresh)
    insert = sa.text(
        "INSERT INTO audit_events (at, actor, source, action, target, outcome, detail) "
        "VALUES (:at, 'admin', '127.0.0.1', 'rule.update', 'chest-ct', 'ok', '{}')"
    )
    with fresh.begin() as conn:
        conn.execute(insert, {"at": T0.replace(tzinfo=None)})
        conn.execute(insert, {"at": T0.replace(tzinfo=None)})
    for statement in (
        "UPDATE audit_events SET actor = 'someone else' WHERE id = 1",
        "UPDATE audit_events SET outcome = 'denied'",
        "DELETE FROM audit_events WHERE id = 1",
        "DELETE FROM audit_events",
    ):
        with pytest.raises(sa.exc.DBAPIError, match="audit_events is append-only"), fresh.begin() as conn:
            conn.execute(sa.text(statement))
    with fresh.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, actor, outcome FROM audit_events ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, "admin", "ok"), (2, "admin", "ok")]


# -- check mode (read-only commands) and serve/worker start-up ----------------------------------------------


def _settings(node_settings: NodeSettings, url: str) -> NodeSettings:
    return node_settings.model_copy(update={"database_url": url})


def test_check_mode_refuses_an_out_of_date_database_and_changes_nothing(
    fresh: sa.Engine, node_settings: NodeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    from dicom_ai_node.node import build_services

    url = fresh.url.render_as_string(hide_password=False)
    settings = _settings(node_settings, url)
    # An empty database (PostgreSQL; for SQLite the file exists once the engine connected).
    empty = snapshot(fresh)
    with pytest.raises(SchemaOutOfDateError, match=r"no database schema yet: run `dicom-ai-node db upgrade`"):
        build_services(settings, migrate="check")
    assert snapshot(fresh) == empty and current_revision(fresh) is None

    upgrade_schema(fresh, "0001")
    _fill_baseline(fresh, n_bulk_jobs=0)
    before, rows = snapshot(fresh), _baseline_rows(fresh)
    with pytest.raises(SchemaOutOfDateError) as info:
        build_services(settings, migrate="check")
    message = str(info.value)
    assert message == (
        f"database schema is at 0001 but this version needs {head_revision()}: run `dicom-ai-node db upgrade`"
    )
    assert "\n" not in message
    assert snapshot(fresh) == before and _baseline_rows(fresh) == rows and current_revision(fresh) == "0001"

    with caplog.at_level(logging.INFO, logger="dicom_ai_node"):
        services = build_services(settings, migrate="upgrade")
    services.engine.dispose()
    upgraded = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert upgraded == [f"database schema upgraded 0001 -> {head_revision()}"]
    assert current_revision(fresh) == head_revision() and _baseline_rows(fresh) == rows

    caplog.clear()
    with caplog.at_level(logging.INFO):
        services = build_services(settings, migrate="check")
        services.engine.dispose()
        services = build_services(settings, migrate="upgrade")  # nothing to do: no log line
        services.engine.dispose()
    assert not [r for r in caplog.records if "schema" in r.getMessage()]


def test_check_mode_does_not_create_a_missing_sqlite_database(
    tmp_path: Path, node_settings: NodeSettings
) -> None:
    from dicom_ai_node.node import build_services

    db_file = tmp_path / "not-yet" / "node.db"
    settings = _settings(node_settings, f"sqlite:///{db_file}")
    with pytest.raises(
        SchemaOutOfDateError, match=rf"^no database at {db_file}: run `dicom-ai-node db upgrade`$"
    ):
        build_services(settings, migrate="check")
    assert not db_file.parent.exists()
    services = build_services(settings, migrate="upgrade")
    services.engine.dispose()
    assert db_file.exists()


def test_a_database_from_a_newer_version_is_refused(fresh: sa.Engine) -> None:
    upgrade_schema(fresh)
    with fresh.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaOutOfDateError, match="0099, which this version does not know"):
        check_schema(fresh)
    with pytest.raises(SchemaOutOfDateError, match="0099"):
        upgrade_schema(fresh)
