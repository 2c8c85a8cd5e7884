"""Queue throughput: jobs/s claimed and completed by worker processes on SQLite (1 process) and
PostgreSQL (1, 2, 4, 8 processes), and how many jobs ran twice (the answer must be 0).

The real queue and worker loop (persistence/queue.py `JobQueue`, worker/runner.py `Worker.run_one` with its
heartbeat thread) drive a dummy handler instead of a model: a 0 ms handler measures the queue alone, a
`--slow-ms` one (20 ms) a stage that waits (a GPU, a PACS) without using this machine's CPU, which shows
how the queue scales across processes when the work is not its own. Jobs are infer jobs as the completion sweep writes them
(payload, dedupe key, a lock key per series). Every handler call appends the job id to its process's log,
so a job handled twice is counted from the outside, next to the database's own attempt counts.
CPU per job (the worker processes' own, plus their PostgreSQL backends' read from /proc) does not depend
on what else the machine runs, unlike the rates: the table gives the load average before each run.

    .venv/bin/python benchmarks/job_queue.py [--jobs 2000] [--slow-jobs 400] [--processes 1 2 4 8]

PostgreSQL: $AINODE_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test, as the
tests); a throwaway database is created and dropped for every run. The reference is the first row,
SQLite with one process, measured in the same run.

(Not named queue.py: a script's folder is first on sys.path, so every `import queue` of the standard
library, in pynetdicom, logging or multiprocessing, would import that script instead.)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import sqlalchemy as sa

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Children wait at most this long for each other at the start line (imports take seconds on 2 busy cores).
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class Run:
    engine: str  # "SQLite" | "PostgreSQL"
    processes: int
    work_ms: float
    jobs: int
    enqueue_per_s: float
    claimed_per_s: float
    completed_per_s: float
    claim_p50_ms: float
    claim_p95_ms: float
    connections: int | None  # peak PostgreSQL backends of the workers (sampled), None on SQLite
    worker_cpu_ms_per_job: float  # the worker processes' own CPU per job
    backend_cpu_ms_per_job: float | None  # their PostgreSQL backends' CPU per job, None on SQLite
    load_before: float  # 1-minute load average when the run started: other work on the machine
    handled_twice: int  # jobs whose handler ran more than once
    not_handled: int  # jobs whose handler never ran
    not_succeeded: int  # jobs not in state succeeded at the end
    extra_attempts: int  # jobs claimed more than once according to the database


def _infer_payload(i: int) -> dict[str, Any]:
    series = f"2.25.{10**20 + i}"
    return {
        "series_instance_uid": series,
        "study_instance_uid": f"2.25.{2 * 10**20 + i}",
        "rule_id": "bench",
        "rule_version": 1,
        "model": "dummy",
        "destinations": ["pacs"],
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process `pid` from /proc, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # Fields 14 and 15 of /proc/PID/stat (utime, stime); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child(url: str, work_ms: float, log_path: str, barrier: Barrier) -> None:
    """One worker process: the real Worker loop over a dummy infer handler until the queue is empty."""
    from dicom_ai_node.domain.jobs import JobKind
    from dicom_ai_node.domain.payloads import InferPayload
    from dicom_ai_node.persistence.db import make_engine
    from dicom_ai_node.persistence.queue import Job, JobQueue
    from dicom_ai_node.worker.runner import JobHandler, Worker

    engine = make_engine(url)
    queue = JobQueue(engine)
    records: list[str] = []
    claim_started = [0.0]

    def handle(job: Job, _payload: InferPayload) -> dict[str, Any]:
        claimed = time.time()
        if work_ms:
            time.sleep(work_ms / 1000)
        records.append(f"{job.id} {claimed - claim_started[0]:.6f} {claimed:.6f}")
        return {"dummy": True}

    worker = Worker(
        queue,
        {JobKind.INFER: JobHandler(InferPayload, handle)},
        [JobKind.INFER],
        lease_s=60,
        heartbeat_s=5,
        poll_interval_s=0.01,
    )
    with engine.connect() as conn:  # open the pool's first connection before the clock starts
        conn.execute(sa.text("SELECT 1"))
    barrier.wait(START_TIMEOUT_S)
    started = time.time()
    cpu_before = _cpu_s()
    done: list[float] = []
    while True:
        claim_started[0] = time.time()
        job = worker.run_one()
        if job is not None:
            done.append(time.time())
            continue
        # Nothing claimable: finished, unless a job is only held back by a lost lock-key race.
        if queue.stats()[JobKind.INFER.value].depth == 0:
            break
        time.sleep(0.005)
    cpu = _cpu_s() - cpu_before
    with open(log_path, "w") as fh:
        fh.write(f"start {started:.6f} {cpu:.6f}\n")
        for record, finished in zip(records, done, strict=True):
            fh.write(f"{record} {finished:.6f}\n")
    engine.dispose()


@contextmanager
def _database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh database with the node's schema: a SQLite file, or a throwaway PostgreSQL database."""
    from dicom_ai_node.persistence.db import create_schema, make_engine

    if kind == "SQLite":
        url = f"sqlite:///{workdir / f'queue-{secrets.token_hex(4)}.db'}"
        engine = make_engine(url)
        create_schema(engine)
        engine.dispose()
        yield url
        return
    admin_url = make_engine(os.environ.get("AINODE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)).url
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"ainode_bench_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        create_schema(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class _BackendSampler(threading.Thread):
    """The workers' PostgreSQL backends while they run: peak count, and CPU seconds from /proc (the server
    runs on this machine; WAL writer and checkpointer are not counted)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(
            sa.make_url(url).set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool
        )
        self.peak = 0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self.stop = threading.Event()

    @property
    def cpu_s(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)

    def run(self) -> None:
        query = sa.text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        with self.engine.connect() as conn:
            while not self.stop.is_set():
                pids = [int(pid) for pid in conn.execute(query).scalars()]
                conn.commit()
                self.peak = max(self.peak, len(pids))
                first_pass = not self._last
                for pid in pids:
                    cpu = _proc_cpu_s(pid)
                    if cpu is not None:
                        # Backends open at the start line count from there; one opened later from 0.
                        self._first.setdefault(pid, cpu if first_pass else 0.0)
                        self._last[pid] = cpu
                self.stop.wait(0.05)
        self.engine.dispose()


def run_case(kind: str, processes: int, work_ms: float, jobs: int, workdir: Path) -> Run:
    from dicom_ai_node.domain.jobs import JobKind, JobStatus
    from dicom_ai_node.persistence.db import make_engine
    from dicom_ai_node.persistence.queue import JobQueue
    from dicom_ai_node.persistence.tables import jobs as jobs_table

    with _database(kind, workdir) as url:
        engine = make_engine(url)
        queue = JobQueue(engine)
        t0 = time.perf_counter()
        for i in range(jobs):
            payload = _infer_payload(i)
            series = payload["series_instance_uid"]
            queue.enqueue(
                JobKind.INFER, payload, dedupe_key=f"infer:{series}:bench:1", lock_key=f"series:{series}"
            )
        enqueue_per_s = jobs / (time.perf_counter() - t0)
        engine.dispose()  # its pooled connection would count as a worker's
        load_before = os.getloadavg()[0]

        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(processes + 1)
        logs = [workdir / f"{kind}-{processes}-{work_ms}-{n}.log" for n in range(processes)]
        children = [
            ctx.Process(target=_child, args=(url, work_ms, str(log), barrier), name=f"bench-worker-{n}")
            for n, log in enumerate(logs)
        ]
        for child in children:
            child.start()
        sampler = _BackendSampler(url) if kind == "PostgreSQL" else None
        barrier.wait(START_TIMEOUT_S)
        if sampler is not None:
            sampler.start()
        for child in children:
            child.join()
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
        failed = [c.name for c in children if c.exitcode != 0]
        if failed:
            raise RuntimeError(f"worker processes failed: {failed}")

        starts: list[float] = []
        worker_cpu_s = 0.0
        handled: Counter[int] = Counter()
        claim_latency: list[float] = []
        claimed_at: list[float] = []
        finished_at: list[float] = []
        for log in logs:
            lines = log.read_text().splitlines()
            _, started, cpu = lines[0].split()
            starts.append(float(started))
            worker_cpu_s += float(cpu)
            for line in lines[1:]:
                job_id, latency, claimed, finished = line.split()
                handled[int(job_id)] += 1
                claim_latency.append(float(latency))
                claimed_at.append(float(claimed))
                finished_at.append(float(finished))
        start = min(starts)
        with engine.connect() as conn:
            not_succeeded = conn.execute(
                sa.select(sa.func.count())
                .select_from(jobs_table)
                .where(jobs_table.c.status != JobStatus.SUCCEEDED.value)
            ).scalar_one()
            extra_attempts = conn.execute(
                sa.select(sa.func.count()).select_from(jobs_table).where(jobs_table.c.attempts != 1)
            ).scalar_one()
            ids = [int(i) for i in conn.execute(sa.select(jobs_table.c.id)).scalars()]
        engine.dispose()
    quantiles = statistics.quantiles(claim_latency, n=20) if len(claim_latency) > 1 else [0.0] * 19
    return Run(
        engine=kind,
        processes=processes,
        work_ms=work_ms,
        jobs=jobs,
        enqueue_per_s=enqueue_per_s,
        claimed_per_s=len(claimed_at) / (max(claimed_at) - start),
        completed_per_s=len(finished_at) / (max(finished_at) - start),
        claim_p50_ms=statistics.median(claim_latency) * 1000,
        claim_p95_ms=quantiles[18] * 1000,
        connections=sampler.peak if sampler is not None else None,
        worker_cpu_ms_per_job=worker_cpu_s * 1000 / jobs,
        backend_cpu_ms_per_job=sampler.cpu_s * 1000 / jobs if sampler is not None else None,
        load_before=load_before,
        handled_twice=sum(1 for n in handled.values() if n > 1),
        not_handled=sum(1 for i in ids if handled[i] == 0),
        not_succeeded=int(not_succeeded),
        extra_attempts=int(extra_attempts),
    )


def table(runs: list[Run]) -> str:
    lines = [
        "| engine | worker processes | handler | jobs | enqueued/s | claimed/s | completed/s "
        "| vs 1 process | claim p50 / p95 ms | CPU ms per job: worker + PG backend | PG connections | handled twice | not handled "
        "| not succeeded | attempts > 1 | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        base = next(b for b in runs if b.engine == r.engine and b.work_ms == r.work_ms and b.processes == 1)
        lines.append(
            f"| {r.engine} | {r.processes} | {r.work_ms:g} ms | {r.jobs} | {r.enqueue_per_s:.0f} "
            f"| {r.claimed_per_s:.0f} | {r.completed_per_s:.0f} | {r.completed_per_s / base.completed_per_s:.2f}x "
            f"| {r.claim_p50_ms:.1f} / {r.claim_p95_ms:.1f} | {r.worker_cpu_ms_per_job:.1f}"
            f"{'' if r.backend_cpu_ms_per_job is None else f' + {r.backend_cpu_ms_per_job:.1f}'} "
            f"| {'-' if r.connections is None else r.connections} "
            f"| {r.handled_twice} | {r.not_handled} | {r.not_succeeded} | {r.extra_attempts} | {r.load_before:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000, help="jobs per run with the 0 ms handler")
    ap.add_argument("--slow-jobs", type=int, default=400, help="jobs per run with the --slow-ms handler")
    ap.add_argument(
        "--slow-ms", type=float, default=20, help="the waiting handler's sleep (0: skip those runs)"
    )
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    runs: list[Run] = []
    plans = [(0.0, args.jobs)] + ([(args.slow_ms, args.slow_jobs)] if args.slow_ms else [])
    with tempfile.TemporaryDirectory(prefix="ainode-queue-bench-") as tmp:
        for work_ms, jobs in plans:
            cases = [("SQLite", 1)] + [("PostgreSQL", n) for n in sorted(set([1, *args.processes]))]
            for kind, processes in cases:
                run = run_case(kind, processes, work_ms, jobs, Path(tmp))
                runs.append(run)
                print(
                    f"{kind:10} x{processes} {work_ms:g} ms: {run.completed_per_s:7.0f} jobs/s completed, "
                    f"{run.handled_twice} handled twice, {run.not_succeeded} not succeeded",
                    file=sys.stderr,
                    flush=True,
                )
    print(f"\nQueue throughput, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}\n")
    print(table(runs))
    bad = [r for r in runs if r.handled_twice or r.not_handled or r.not_succeeded or r.extra_attempts]
    if bad:
        print(f"\nFAILED: {len(bad)} runs handled a job twice or not at all", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
