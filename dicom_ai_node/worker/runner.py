"""Claims jobs and runs them, with heartbeats from a separate thread.

The job runs in the worker's own thread; a small heartbeat thread extends the lease meanwhile, so a long
inference is not taken for a dead worker, and a worker that really dies (kill -9, power loss) stops
heartbeating and its job is re-queued by `JobQueue.recover_stalled`.

A claimed job's payload is parsed into its kind's model (domain/payloads.py) before its stage runs: a
payload that does not validate is a permanent error (dead letter at once, naming the field), never a
KeyError halfway through a stage that would be retried.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import BasePayload, parse_as
from dicom_ai_node.errors import DatabaseError, PermanentError, TransientError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.queue import Job, JobQueue, LeaseLostError
from dicom_ai_node.worker.outage import DatabaseOutage

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BasePayload)


@dataclass(frozen=True)
class JobHandler(Generic[P]):
    """Runs one job kind: the payload model a claimed job's payload is parsed into, and the stage that
    takes the parsed payload and returns the job's result (no PHI: the admin page shows it)."""

    payload_model: type[P]
    run: Callable[[Job, P], dict[str, Any]]
    # Called once when a job of this kind goes to the dead letter, with its error (e.g. the deliver
    # job's "instances transferred: failed" audit event); must not raise.
    on_dead: Callable[[Job, str], None] | None = None

    def __call__(self, job: Job) -> dict[str, Any]:
        # PayloadError (permanent) names the fields that do not validate.
        return self.run(job, parse_as(self.payload_model, job.payload, job_id=job.id))


def new_worker_id(label: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{label}:{uuid.uuid4().hex[:6]}"


class _Heartbeat(threading.Thread):
    def __init__(self, queue: JobQueue, job: Job, worker_id: str, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.queue, self.job, self.worker_id, self.interval_s = queue, job, worker_id, interval_s
        self.stop_event = threading.Event()
        self.lease_lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                if not self.queue.heartbeat(self.job.id, self.worker_id):
                    self.lease_lost = True
                    log.warning("job %d: lease lost; its result will not be committed", self.job.id)
                    return
            except DatabaseError as exc:  # down or restarting: the next beat retries
                log.warning("job %d: heartbeat failed: %s", self.job.id, exc)
            except Exception:  # noqa: BLE001 - a DB hiccup must not kill the heartbeat; next beat retries
                log.warning("job %d: heartbeat failed", self.job.id, exc_info=True)


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        handlers: Mapping[JobKind, JobHandler[Any]],
        kinds: Sequence[JobKind],
        *,
        lease_s: float,
        heartbeat_s: float,
        poll_interval_s: float,
        worker_id: str | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        wrong = [k.value for k, h in handlers.items() if h.payload_model.KIND != k]
        if wrong:
            raise ValueError(f"handlers for {wrong} take another kind's payload")
        self.queue = queue
        self.handlers = dict(handlers)
        self.kinds = list(kinds)
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.poll_interval_s = poll_interval_s
        self.worker_id = worker_id or new_worker_id("+".join(k.value for k in self.kinds))
        self.metrics = metrics
        self._current: Job | None = None  # the job run_one is running (for release_current)

    def run_one(self, stop: threading.Event | None = None) -> Job | None:
        """Claim and run at most one job; return it (None when nothing was runnable).

        A job that fails once `stop` is set was interrupted by the shutdown (the inference process is
        killed then): it is released back to the queue, not failed, and runs again after the restart.
        """
        job = self.queue.claim(self.worker_id, self.kinds, self.lease_s)
        if job is None:
            return None
        self._current = job
        beat = _Heartbeat(self.queue, job, self.worker_id, self.heartbeat_s)
        beat.start()
        try:
            result = self.handlers[job.kind](job)
        except Exception as exc:  # noqa: BLE001 - classified below
            if stop is not None and stop.is_set():
                self._release(job, f"{type(exc).__name__}: {exc}")
            elif isinstance(exc, PermanentError | TransientError):
                self._fail(job, exc, permanent=isinstance(exc, PermanentError))
            else:  # an unexpected bug: retry with backoff, then dead letter
                log.exception("job %d (%s) crashed", job.id, job.kind.value)
                self._fail(job, exc, permanent=False)
        else:
            if not beat.lease_lost:
                try:
                    self.queue.succeed(job.id, self.worker_id, result)
                except LeaseLostError:
                    # Recovered by another process meanwhile; its re-run writes the same deterministic UIDs.
                    log.warning("job %d finished after its lease was lost; the re-run will redo it", job.id)
                else:
                    self._finished(job, JobStatus.SUCCEEDED)
        finally:
            self._current = None
            beat.stop_event.set()
            beat.join()
        return job

    def release_current(self) -> None:
        """Shutdown, from another thread: release the job this worker is still running (its thread did
        not end in time); if that thread finishes it later, its result is not committed (lease lost)."""
        job = self._current
        if job is not None:
            self._release(job, "still running at shutdown")

    def _release(self, job: Job, why: str) -> None:
        try:
            released = self.queue.release(job.id, self.worker_id)
        except Exception:  # noqa: BLE001 - e.g. the database is gone too: recover_stalled re-queues it later
            log.warning(
                "job %d could not be released at shutdown; its lease will expire", job.id, exc_info=True
            )
            return
        if released:
            log.info(
                "job %d (%s) released at shutdown (%s); it runs again after the restart",
                job.id,
                job.kind.value,
                why,
            )

    def _fail(self, job: Job, exc: BaseException, *, permanent: bool) -> None:
        message = f"{type(exc).__name__}: {exc}"
        try:
            status = self.queue.fail(job.id, self.worker_id, message, permanent=permanent)
        except LeaseLostError:
            log.warning("job %d failed after its lease was lost: %s", job.id, message)
            return
        self._finished(job, status)
        on_dead = self.handlers[job.kind].on_dead
        if status == JobStatus.DEAD and on_dead is not None:
            on_dead(job, message)
        level = logging.ERROR if status == JobStatus.DEAD else logging.WARNING
        log.log(
            level,
            "job %d (%s) attempt %d failed -> %s: %s",
            job.id,
            job.kind.value,
            job.attempts,
            status.value,
            message,
        )

    def _finished(self, job: Job, status: JobStatus) -> None:
        # Only outcomes this worker committed: a lost lease is counted by whoever finishes the re-run.
        if self.metrics is not None:
            self.metrics.observe_job_finished(job.kind.value, status.value)

    def run_forever(self, stop: threading.Event) -> None:
        log.info("worker %s started for %s", self.worker_id, [k.value for k in self.kinds])
        outage = DatabaseOutage(f"worker {self.worker_id}", log, base_s=self.poll_interval_s)
        while not stop.is_set():
            tried_at = time.monotonic()
            try:
                job = self.run_one(stop)
            except DatabaseError as exc:
                # Down or restarting: one line per outage, polls spaced out; a job it interrupted is
                # re-queued by recover_stalled once its lease expires.
                stop.wait(outage.failed(exc))
                continue
            except Exception:  # noqa: BLE001 - a bug in the loop itself: keep the worker alive, back off
                log.exception("worker %s: claim loop error", self.worker_id)
                job = None
            else:
                outage.cleared(tried_at)
            if job is None:
                stop.wait(self.poll_interval_s)
        log.info("worker %s stopped", self.worker_id)
