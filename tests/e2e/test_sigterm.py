"""SIGTERM (what an orchestrator sends before it stops a container): the node stops cleanly and in time.

The real node (`dicom-ai-node serve`, SQLite, workers in the process, DCMTK storescp as the PACS) gets
SIGTERM while
- one association is half-way through 120 instances: it completes within the shutdown grace, every
  instance acknowledged and stored;
- another one sends slowly, past the grace: it is ended with an A-ABORT, every instance acknowledged
  before that stored, nothing half-stored (no spool file without its row, no row without its file);
- an infer job is inside its model: the job goes back to the queue at once (not 'running' until its
  lease expires, and without using up an attempt), and runs to the end after a restart;
while new associations are refused (the port closes) and the process exits 0 within SHUTDOWN_BOUND_S.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import DeliverPayload
from dicom_ai_node.errors import TransientError
from dicom_ai_node.node import start_worker_threads, stop_workers
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.worker.runner import JobHandler, Worker
from tests.support.payloads import deliver_payload

pytestmark = pytest.mark.e2e

SHUTDOWN_BOUND_S = 30
# dicom.shutdown_grace_s: how long associations in flight may go on after SIGTERM. The fast association
# has BULK_INSTANCES / 2 to go then: several times what a loaded 2-core machine needs for them.
GRACE_S = 10
BULK_INSTANCES = 120
SLOW_GAP_S = 0.4  # the slow sender's pause between instances: 120 of them take far longer than GRACE_S
CALLING_AE = "STORESCU"  # on the allow-list NodeProcess writes

# A segmentation model that holds inside `segment` while the hold file exists (so SIGTERM finds it
# running), after touching the started file; loaded by the inference process from PYTHONPATH.
MODEL_MODULE = """
import os
import time
from pathlib import Path

import numpy as np

from dicom_ai_node.domain.results import SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, ModelIdentity, SegmentSpec


class HeldModel:
    task = "segmentation"
    accepts_modalities = ("CT",)

    def __init__(self, manifest, device="cpu"):
        self.identity = ModelIdentity(manifest.name, manifest.version, description="held until released")
        self.segments = [SegmentSpec(1, "Body", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, (80, 180, 250))]

    def segment(self, volume):
        Path(os.environ["SIGTERM_TEST_STARTED"]).touch()
        deadline = time.monotonic() + 300
        while Path(os.environ["SIGTERM_TEST_HOLD"]).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return (volume.array > volume.array.mean()).astype(np.uint8)
"""

MANIFEST = """
name: held
version: "1.0.0"
task: segmentation
format: builtin
entry: sigterm_held_model:HeldModel
description: test model that waits for a file to go away
accepts: {modalities: [CT]}
outputs:
  segments:
    - value: 1
      label: Body
      type: {value: "39607008", scheme: SCT, meaning: Lung}
      colour: [80, 180, 250]
licence: test
training_data: none
intended_use: tests only
"""

RULES = """
rules:
  - id: held-ct
    version: 1
    conditions:
      - {attribute: Modality, equals: CT}
      - {attribute: SeriesDescription, equals: held}
    action: {model: held, destinations: [pacs], quiet_period_s: 1}
"""


@dataclass
class Sender:
    """One association sending `datasets`, recording what the node acknowledged and how it ended."""

    port: int
    datasets: list[Dataset]
    gap_s: float = 0.0
    acknowledged: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    ending: str = "not started"
    abort_received: bool = False
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Sender:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _on_pdu(self, event: Event) -> None:
        if type(event.pdu).__name__ == "A_ABORT_RQ":
            self.abort_received = True

    def _run(self) -> None:
        try:
            ae = AE(ae_title=CALLING_AE)
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate(
                "127.0.0.1", self.port, ae_title="AINODE", evt_handlers=[(evt.EVT_PDU_RECV, self._on_pdu)]
            )
            assert assoc.is_established, "association not established"
            self.ending = "sending"
            for ds in self.datasets:
                if not assoc.is_established:
                    break
                try:
                    status = assoc.send_c_store(ds)
                except RuntimeError:  # the association ended between the check and the request
                    break
                uid = str(ds.SOPInstanceUID)
                if status and int(status.Status) == 0x0000:
                    self.acknowledged.append(uid)
                else:
                    self.unanswered.append(uid)
                if self.gap_s:
                    time.sleep(self.gap_s)
            if assoc.is_established:
                assoc.release()
            self.ending = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "other"
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def join(self, timeout_s: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "sender still running"
        assert self.error is None, repr(self.error)


def _bulk(directory: Path, n: int) -> list[Dataset]:
    files = write_ct_series(directory, n_slices=n, rows=8, cols=8)
    datasets: list[Dataset] = [dcmread(f) for f in files]
    for ds in datasets:
        ds.SeriesDescription = "bulk"  # routed nowhere
    return datasets


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, node: NodeProcess) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{node.log_tail()}")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _refused(port: int) -> bool:
    """A new association: not established (TCP refused, rejected or aborted)."""
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if assoc.is_established:
        assoc.abort()
        return False
    return True


def _rows(engine: sa.Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql)).all())


def _check_spool(engine: sa.Engine, spool: Path, acknowledged: list[str]) -> None:
    """Every acknowledged instance stored and readable; no row without its file, no file without its row."""
    rows = {uid: path for uid, path in _rows(engine, "SELECT sop_instance_uid, spool_path FROM instances")}
    missing = [uid for uid in acknowledged if uid not in rows]
    assert not missing, f"{len(missing)} acknowledged instances have no row, e.g. {missing[:3]}"
    for uid in acknowledged:
        assert dcmread(spool / rows[uid], stop_before_pixels=True).SOPInstanceUID == uid
    files = {str(p.relative_to(spool)) for p in (spool / "instances").rglob("*.dcm")}
    assert files == set(rows.values()), (
        f"files without rows: {sorted(files - set(rows.values()))[:3]}, "
        f"rows without files: {sorted(set(rows.values()) - files)[:3]}"
    )


def test_sigterm_drains_associations_releases_the_running_job_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models, code = tmp_path / "models" / "held", tmp_path / "code"
    models.mkdir(parents=True)
    code.mkdir()
    (models / "manifest.yaml").write_text(MANIFEST)
    (code / "sigterm_held_model.py").write_text(textwrap.dedent(MODEL_MODULE))
    (tmp_path / "rules.yaml").write_text(RULES)
    hold, started = tmp_path / "hold", tmp_path / "started"
    hold.touch()
    # The node and its inference process inherit these (NodeProcess passes os.environ on).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SIGTERM_TEST_HOLD", str(hold))
    monkeypatch.setenv("SIGTERM_TEST_STARTED", str(started))

    held = write_ct_series(tmp_path / "held", n_slices=4, rows=16, cols=16)
    for path in held:
        ds = dcmread(path)
        ds.SeriesDescription = "held"
        ds.save_as(path)
    fast_datasets = _bulk(tmp_path / "fast", BULK_INSTANCES)
    slow_datasets = _bulk(tmp_path / "slow", BULK_INSTANCES)

    with storescp(tmp_path / "pacs") as pacs_port:
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            quiet_period_s=1,
            pacs_verify=False,  # storescp has no C-FIND
            extra={
                "rules_file": str(tmp_path / "rules.yaml"),
                "models": {"paths": [str(models.parent)]},
            },
        )
        config = yaml.safe_load(node.config_path.read_text())
        config["dicom"]["shutdown_grace_s"] = GRACE_S
        node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        engine = make_engine(node.database_url)
        try:
            node.start()
            storescu(held, node.ae_title, node.dicom_port)
            slow = Sender(node.dicom_port, slow_datasets, gap_s=SLOW_GAP_S).start()
            _wait(started.exists, 120, "the model to start on the held series", node)
            [infer] = [j for j in node.jobs() if j["kind"] == "infer"]
            assert infer["status"] == "running"

            fast = Sender(node.dicom_port, fast_datasets).start()
            _wait(
                lambda: len(fast.acknowledged) >= BULK_INSTANCES // 2, 120, "half the fast association", node
            )
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            sigterm_at = time.monotonic()

            # New associations are refused while the old ones drain: the port closes at once.
            _wait(lambda: _port_closed(node.dicom_port), 5, "the DICOM port to close", node)
            closed_after_s = time.monotonic() - sigterm_at
            assert _refused(node.dicom_port)
            fast_acked_at_sigterm = len(fast.acknowledged)
            exit_code = node.proc.wait(timeout=SHUTDOWN_BOUND_S + 30)
            exited_after_s = time.monotonic() - sigterm_at
            fast.join(30)
            slow.join(30)
            log = node.log_tail(200)
            print(  # the figures, shown with -s or on a failure
                f"SIGTERM: port closed after {closed_after_s:.2f} s, exit {exit_code} after {exited_after_s:.1f} s; "
                f"fast association {fast_acked_at_sigterm}+ -> {len(fast.acknowledged)}/{BULK_INSTANCES} "
                f"({fast.ending}); slow {len(slow.acknowledged)}/{BULK_INSTANCES} ({slow.ending})"
            )
            assert exit_code == 0, log
            assert exited_after_s < SHUTDOWN_BOUND_S, f"exited {exited_after_s:.1f} s after SIGTERM\n{log}"

            # The fast association finished within the grace; the slow one was aborted at its end.
            assert (fast.ending, len(fast.acknowledged), fast.unanswered) == ("released", BULK_INSTANCES, [])
            assert slow.ending == "aborted" and slow.abort_received, (slow.ending, log)
            assert 0 < len(slow.acknowledged) < BULK_INSTANCES
            assert len(slow.unanswered) <= 1  # at most the one in flight when the A-ABORT came
            _check_spool(engine, node.workdir / "spool", fast.acknowledged + slow.acknowledged)

            # The running job went back to the queue, its attempt not counted, no worker holding it.
            [job] = _rows(engine, f"SELECT status, attempts, worker_id FROM jobs WHERE id = {infer['id']}")
            assert tuple(job) == ("queued", 0, None), (tuple(job), log)

            # After a restart it runs to the end and its results reach the PACS once.
            hold.unlink()
            node.start()

            def done() -> bool:
                jobs = node.jobs()
                return len(jobs) >= 2 and all(j["status"] == "succeeded" for j in jobs)

            _wait(done, 120, "the released job and its delivery to succeed", node)
            infer = next(j for j in node.jobs() if j["kind"] == "infer")
            assert infer["attempts"] == 1
            _check_spool(engine, node.workdir / "spool", fast.acknowledged + slow.acknowledged)
            assert list((node.workdir / "spool" / "incoming").iterdir()) == []
        finally:
            node.stop()
            engine.dispose()
    modalities = sorted(dcmread(f, stop_before_pixels=True).Modality for f in (tmp_path / "pacs").iterdir())
    assert modalities == ["SEG", "SR"], modalities


# -- the worker's side, in one process on SQLite (no node needed) --------------------------------------


def _queue(tmp_path: Path) -> JobQueue:
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    create_schema(engine)
    return JobQueue(engine)


def _worker(queue: JobQueue, run: Callable[[Job, DeliverPayload], dict[str, Any]]) -> Worker:
    handlers: dict[JobKind, JobHandler[Any]] = {JobKind.DELIVER: JobHandler(DeliverPayload, run)}
    return Worker(queue, handlers, [JobKind.DELIVER], lease_s=60, heartbeat_s=30, poll_interval_s=0.05)


@pytest.mark.parametrize("stopping", [True, False], ids=["at-shutdown", "otherwise"])
def test_a_job_that_fails_at_shutdown_is_released_not_counted(tmp_path: Path, stopping: bool) -> None:
    queue = _queue(tmp_path)
    job_id = queue.enqueue(JobKind.DELIVER, deliver_payload())
    stop = threading.Event()

    def run(job: Job, payload: DeliverPayload) -> dict[str, Any]:
        if stopping:
            stop.set()  # SIGTERM while the job runs: the node then kills what the job waits on
        raise TransientError("connection closed")

    _worker(queue, run).run_one(stop)
    job = queue.get(job_id)
    assert job is not None
    if stopping:
        assert (job.status, job.attempts, job.worker_id, job.last_error) == (JobStatus.QUEUED, 0, None, None)
    else:  # an ordinary failure: an attempt used, retried after its backoff
        assert (job.status, job.attempts) == (JobStatus.FAILED, 1)


def test_stop_workers_releases_the_job_of_a_thread_that_does_not_end(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    job_id = queue.enqueue(JobKind.DELIVER, deliver_payload())
    running, finish = threading.Event(), threading.Event()

    def run(job: Job, payload: DeliverPayload) -> dict[str, Any]:
        running.set()
        finish.wait(30)  # a delivery that takes longer than the shutdown waits
        return {}

    worker = _worker(queue, run)
    stop = threading.Event()
    [thread] = start_worker_threads([worker], stop)
    assert running.wait(30)
    stop.set()
    started = time.monotonic()
    stop_workers([worker], [thread], None, timeout_s=0.5)
    assert time.monotonic() - started < 5
    job = queue.get(job_id)
    assert job is not None and (job.status, job.attempts, job.worker_id) == (JobStatus.QUEUED, 0, None)
    # The thread finishing later does not overwrite the release: its lease is gone.
    finish.set()
    thread.join(30)
    job = queue.get(job_id)
    assert job is not None and job.status == JobStatus.QUEUED
