"""Composition root: builds the node's objects from settings and runs them (used by the CLI).

Nothing is built at import time; `build_services` is called from `main()`-level code and everything
is passed in explicitly.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_ai_node import __version__
from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.jobs import JobKind, RetryPolicy
from dicom_ai_node.domain.rules import RuleSet, load_rules
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.infer.registry import ModelRegistry, default_registry
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.route.completion import CompletionSweep
from dicom_ai_node.store.retention import RetentionSweep
from dicom_ai_node.store.spool import Spool
from dicom_ai_node.worker.runner import Worker
from dicom_ai_node.worker.stages import StageContext, run_deliver, run_infer

log = logging.getLogger(__name__)


class RulesFile:
    """The rules file, re-read when it changes on disk, so admin edits apply without a restart.

    A broken edit keeps the last good rule set (and logs why) instead of stopping routing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._rules = RuleSet()
        self._lock = threading.Lock()

    def __call__(self) -> RuleSet:
        with self._lock:
            try:
                mtime = os.stat(self.path).st_mtime
            except OSError:
                log.error("rules file %s is missing; keeping %d rules", self.path, len(self._rules.rules))
                return self._rules
            if mtime != self._mtime:
                try:
                    self._rules = load_rules(self.path)
                    log.info("loaded %d rules from %s", len(self._rules.rules), self.path)
                except Exception as exc:  # noqa: BLE001 - RuleError or YAML error: keep last good rules
                    log.error("rules file %s not loaded, keeping previous rules: %s", self.path, exc)
                self._mtime = mtime
            return self._rules


@dataclass
class Services:
    settings: NodeSettings
    repo: SeriesRepository
    queue: JobQueue
    spool: Spool
    rules: RulesFile
    registry: ModelRegistry
    engine: Any = None
    threads: list[threading.Thread] = field(default_factory=list)


def build_services(settings: NodeSettings, registry: ModelRegistry | None = None) -> Services:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    w = settings.worker
    policy = RetryPolicy(base_s=w.backoff_base_s, cap_s=w.backoff_cap_s, max_attempts=w.max_attempts)
    return Services(
        settings=settings,
        repo=SeriesRepository(engine),
        queue=JobQueue(engine, policy),
        spool=Spool(settings.spool_dir),
        rules=RulesFile(settings.rules_file),
        registry=registry or default_registry(settings.models.device, settings.models.paths),
        engine=engine,
    )


def build_scheduler(services: Services, completion_sweep: bool = True) -> BackgroundScheduler:
    """In-process, idempotent DB sweeps only (notes/reliability-security.md on APScheduler).

    Every process recovers stalled jobs; a worker-only process (`completion_sweep=False`) leaves routing
    and retention to the receiving nodes.
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
    def run() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a failed sweep must not stop the scheduler; next run retries
            log.exception("%s failed", name)

    run.__name__ = name.replace(" ", "_")
    return run


def build_workers(services: Services, kinds: list[JobKind]) -> list[Worker]:
    """One worker thread per job kind, so a slow inference never delays deliveries."""
    # One inference host per node: infer jobs run one at a time in its warm child process, so each
    # model is loaded once (not once per thread) and a hung model can be killed at the timeout.
    inference = InferenceHost.from_settings(services.settings.models)
    ctx = StageContext(
        services.settings, services.repo, services.queue, services.spool, inference, __version__
    )
    handlers = {
        JobKind.INFER: lambda job: run_infer(job, ctx),
        JobKind.DELIVER: lambda job: run_deliver(job, ctx),
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
        )
        for kind in kinds
    ]


def start_worker_threads(workers: list[Worker], stop: threading.Event) -> list[threading.Thread]:
    threads = []
    for worker in workers:
        t = threading.Thread(target=worker.run_forever, args=(stop,), name=f"worker-{worker.kinds[0].value}")
        t.start()
        threads.append(t)
    return threads
