"""Composition root: builds the node's objects from settings and runs them (used by the CLI).

Nothing is built at import time; `build_services` is called from `main()`-level code and everything
is passed in explicitly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_ai_node import __version__
from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.jobs import JobKind, RetryPolicy
from dicom_ai_node.domain.payloads import DeliverPayload, InferPayload, PullPayload
from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.infer.registry import ModelRegistry, default_registry
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.db import (
    SchemaOutOfDateError,
    check_schema,
    make_engine,
    sqlite_path,
    upgrade_schema,
)
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.persistence.rules_store import RuleStore
from dicom_ai_node.pull.service import Puller
from dicom_ai_node.route.completion import CompletionSweep, SweepTrigger
from dicom_ai_node.rules_file import load_rules
from dicom_ai_node.store.retention import RetentionSweep
from dicom_ai_node.store.spool import Spool
from dicom_ai_node.worker.audit import audit_deliver_dead
from dicom_ai_node.worker.context import StageContext
from dicom_ai_node.worker.outage import DatabaseOutage
from dicom_ai_node.worker.pull_stage import run_pull
from dicom_ai_node.worker.runner import JobHandler, Worker
from dicom_ai_node.worker.stages import run_deliver, run_infer

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: NodeSettings
    repo: SeriesRepository
    queue: JobQueue
    spool: Spool
    # Routing rules live in the database (versioned); a saved change reaches every process on its
    # next sweep without a restart.
    rules: RuleStore
    registry: ModelRegistry
    engine: Any = None
    threads: list[threading.Thread] = field(default_factory=list)


def build_services(
    settings: NodeSettings,
    registry: ModelRegistry | None = None,
    *,
    migrate: Literal["upgrade", "check"] = "check",
) -> Services:
    """Build the node's objects. `migrate="upgrade"` brings the database schema to head first (serve and
    worker with auto_upgrade_schema); "check" creates and alters nothing and raises SchemaOutOfDateError
    (one line saying what to run) when the schema is behind or, for SQLite, the file does not exist."""
    engine = _open_database(settings.database_url, migrate)
    w = settings.worker
    policy = RetryPolicy(base_s=w.backoff_base_s, cap_s=w.backoff_cap_s, max_attempts=w.max_attempts)
    return Services(
        settings=settings,
        repo=SeriesRepository(engine),
        queue=JobQueue(engine, policy),
        spool=Spool(settings.spool_dir),
        rules=RuleStore(engine),
        registry=registry or default_registry(settings.models.device, settings.models.paths),
        engine=engine,
    )


def _open_database(url: str, migrate: Literal["upgrade", "check"]) -> Any:
    if migrate == "check":
        path = sqlite_path(url)
        # Checked before make_engine, which would create the file (and its folder) on first connect.
        if path is not None and not path.exists():
            raise SchemaOutOfDateError(f"no database at {path}: run `dicom-ai-node db upgrade`")
    engine = make_engine(url)
    try:
        if migrate == "upgrade":
            before, after = upgrade_schema(engine)
            if before != after:
                log.info("database schema upgraded %s -> %s", before or "empty", after)
        else:
            check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def build_scheduler(
    services: Services, completion_sweep: bool = True, sweep_now: SweepTrigger | None = None
) -> BackgroundScheduler:
    """In-process, idempotent DB sweeps only (docs/architecture.md, "Idempotent sweeps").

    Every process recovers stalled jobs; a worker-only process (`completion_sweep=False`) leaves routing
    and retention to the receiving nodes. `sweep_now` (kicked by the SCP when a sender signals a series
    complete) is started here to run the completion sweep at once; the caller stops it.
    """
    s = services.settings
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )
    if completion_sweep:
        sweep = CompletionSweep(
            services.repo,
            services.queue,
            services.rules,
            s.quiet_period_s,
            max_attempts=s.worker.max_attempts,
        )
        scheduler.add_job(
            _guarded(sweep.run_once, "completion sweep"),
            "interval",
            seconds=s.sweep_interval_s,
            id="completion-sweep",
        )
        if sweep_now is not None:
            sweep_now.start(sweep.run_once)
        if s.retention.days:
            retention = RetentionSweep(services.repo, services.spool, s.retention)
            scheduler.add_job(
                _guarded(retention.run_once, "retention sweep"),
                "interval",
                seconds=s.retention.interval_s,
                id="retention",
                # First run soon after start, not an interval later: a node restarted daily must still purge.
                next_run_time=datetime.now(UTC) + timedelta(seconds=60),
            )
    scheduler.add_job(
        _guarded(lambda: services.queue.recover_stalled(s.worker.lease_s), "stalled-job recovery"),
        "interval",
        seconds=max(1.0, s.worker.heartbeat_s),
        id="stalled-jobs",
    )
    return scheduler


def _guarded(fn: Any, name: str) -> Any:
    outage = DatabaseOutage(name, log)

    def run() -> None:
        try:
            fn()
        except DatabaseError as exc:  # down or restarting: one line per outage, the next run retries
            outage.failed(exc)
        except Exception:  # noqa: BLE001 - a failed sweep must not stop the scheduler; next run retries
            log.exception("%s failed", name)
        else:
            outage.cleared()

    run.__name__ = name.replace(" ", "_")
    return run


def seed_rules(services: Services) -> int:
    """First start only: the rules file becomes the database's first rule versions (audited).

    Afterwards the database is the source of truth; `rules import FILE` brings YAML edits in as new
    versions. A missing or broken file at first start seeds nothing and says why.
    """
    store = services.rules
    if store.has_history():
        return 0
    path = services.settings.rules_file
    if not path.is_file():
        log.warning("no rules yet and no rules file at %s: nothing is routed until rules are added", path)
        return 0
    count = store.seed(load_rules(path), actor="system")
    if count:
        AuditLog(services.engine).record(
            actor="system",
            source="startup",
            action="rule.seed",
            target=str(path.name),
            detail={"rules": count, "file": str(path)},
        )
        log.info("seeded %d routing rules from %s into the database", count, path)
    return count


def build_workers(
    services: Services,
    kinds: list[JobKind],
    *,
    inference: InferenceHost | None = None,
    metrics: NodeMetrics | None = None,
    audit: AuditLog | None = None,
) -> list[Worker]:
    """One worker thread per job kind, so a slow inference never delays deliveries.

    Deliver and pull jobs write "dicom.instances_transferred" audit events (worker/audit.py) to `audit`,
    by default the node's own audit table."""
    # One inference host per node: infer jobs run one at a time in its warm child process, so each
    # model is loaded once (not once per thread) and a hung model can be killed at the timeout.
    inference = inference or InferenceHost.from_settings(services.settings.models)
    if audit is None and services.engine is not None:
        audit = AuditLog(services.engine)
    ctx = StageContext(
        services.settings,
        services.repo,
        services.queue,
        services.spool,
        inference,
        __version__,
        metrics,
        audit,
    )
    puller = Puller(services.settings, services.spool, services.repo)

    def deliver_dead(job: Job, error: str) -> None:
        if audit is not None:
            audit_deliver_dead(audit, services.settings, services.spool, job, error)

    handlers: dict[JobKind, JobHandler[Any]] = {
        JobKind.INFER: JobHandler(InferPayload, lambda job, payload: run_infer(job, payload, ctx)),
        JobKind.DELIVER: JobHandler(
            DeliverPayload, lambda job, payload: run_deliver(job, payload, ctx), on_dead=deliver_dead
        ),
        JobKind.PULL: JobHandler(
            PullPayload, lambda job, payload: run_pull(job, payload, puller, services.queue, audit)
        ),
    }
    w = services.settings.worker
    return [
        Worker(
            services.queue,
            handlers,
            [kind],
            lease_s=w.lease_s,
            heartbeat_s=w.heartbeat_s,
            poll_interval_s=w.poll_interval_s,
            metrics=metrics,
        )
        for kind in kinds
    ]


def start_worker_threads(workers: list[Worker], stop: threading.Event) -> list[threading.Thread]:
    threads = []
    for worker in workers:
        # Daemon threads: one still busy when `stop_workers` gives up has had its job released, and must
        # not keep the process from exiting.
        t = threading.Thread(
            target=worker.run_forever, args=(stop,), name=f"worker-{worker.kinds[0].value}", daemon=True
        )
        t.start()
        threads.append(t)
    return threads


def stop_workers(
    workers: list[Worker], threads: list[threading.Thread], inference: InferenceHost | None, timeout_s: float
) -> None:
    """Shutdown, once the `stop` event of `start_worker_threads` is set: kill a running inference (its
    worker releases the job back to the queue at once), wait up to `timeout_s` for the worker threads to
    end, then release the jobs of those still busy. Nothing is left 'running' until its lease expires."""
    if inference is not None:
        inference.interrupt()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        worker.release_current()


class Receiver(Protocol):
    """The node's C-STORE edge, whichever `dicom.receiver` names."""

    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self, grace_s: float = 0) -> None: ...


def build_receiver(
    settings: NodeSettings,
    services: Services,
    metrics: NodeMetrics | None = None,
    audit: AuditLog | None = None,
    on_series_complete: Callable[[], None] | None = None,
) -> Receiver:
    """`dicom.receiver`: "pynetdicom", the SCP in this process (receive/scp.py), or "dcmtk", the native
    receiver (receive/native.py), a child process that this node starts on `start()`, restarts when it
    dies and stops on `stop()`; ConfigError when it is not built."""
    if settings.dicom.receiver == "dcmtk":
        from dicom_ai_node.receive.native import NativeReceiver

        return NativeReceiver(
            settings, services.spool, services.repo, metrics, audit, on_series_complete=on_series_complete
        )
    from dicom_ai_node.receive.scp import StorageSCP

    return StorageSCP(
        settings, services.spool, services.repo, metrics, audit=audit, on_series_complete=on_series_complete
    )
