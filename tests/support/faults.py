"""Fault injection against the real node: parallel C-STORE senders that record every instance's status,
a seeded kill -9 schedule, and the consistency checks run after recovery.

Used by tests/e2e/test_faults_kill9.py (3 rounds, inside CI's budget) and scripts/fault_soak.py (the
documented longer run). Each sender is a pynetdicom SCU on its own thread and association, as a modality
is: it sends its queue one instance at a time and re-sends an instance until the node answers Success
(0x0000), so an instance is acknowledged exactly once and never sent again afterwards. Whatever the node
acknowledged must therefore be in its spool and database after any number of kills, without help from
the sender.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.persistence.db import make_engine
from dicom_ai_node.persistence.tables import instances, jobs, results, series

SUCCESS = 0x0000
FAULT_RULE_ID = "fault-ct-lungs"
FAULT_MODEL = "ct-lung-classical"
# Seconds a sender waits before it tries again after a lost association or a refused instance.
RETRY_S = 0.1


# -- what is sent -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One file a sender sends, with the data set bytes as they are on the wire (after the File Meta)."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    data_set: bytes


def read_instance(path: Path) -> Instance:
    file_meta, offset = split_dataset(path)
    ds = dcmread(path, stop_before_pixels=True)
    return Instance(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=str(file_meta.TransferSyntaxUID),
        data_set=path.read_bytes()[offset:],
    )


def stored_data_set(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a stored Part 10 file: what follows its File Meta."""
    file_meta, offset = split_dataset(path)
    return str(file_meta.TransferSyntaxUID), path.read_bytes()[offset:]


def ct_series(
    directory: Path, n_instances: int, *, study_instance_uid: str, series_number: int
) -> list[Instance]:
    """A synthetic chest CT phantom ct-lung-classical finds both lungs in (6 mm pixels, 10 mm slices)."""
    paths = write_ct_series(
        directory,
        n_slices=n_instances,
        pixel_spacing=(6.0, 6.0),
        slice_thickness=10.0,
        study_instance_uid=study_instance_uid,
        series_number=series_number,
    )
    return [read_instance(p) for p in paths]


def plan_batches(
    directory: Path, *, batches: int, senders: int, instances_per_series: int
) -> list[list[list[Instance]]]:
    """`batches` x `senders` series: batch b gives each sender its own series; senders 2k and 2k+1 share
    a study in each batch (two modalities or PACS sending parts of one study at once)."""
    plan: list[list[list[Instance]]] = []
    for b in range(batches):
        studies = [generate_uid() for _ in range((senders + 1) // 2)]
        plan.append(
            [
                ct_series(
                    directory / f"b{b:02d}s{s}",
                    instances_per_series,
                    study_instance_uid=studies[s // 2],
                    series_number=100 * b + s + 1,
                )
                for s in range(senders)
            ]
        )
    return plan


def fault_rules_file(path: Path, instances_per_series: int, quiet_period_s: float = 1.0) -> Path:
    """One rule: a CT series with all its instances in goes to ct-lung-classical (fast, no weights).

    The minimum count keeps a series cut short by a kill out of inference: it reads "no rule matched"
    until the re-sent rest completes it, which re-opens it as its next generation.
    """
    rules = {
        "rules": [
            {
                "id": FAULT_RULE_ID,
                "version": 1,
                "description": "fault tests: complete synthetic CT series -> ct-lung-classical",
                "conditions": [
                    {"attribute": "Modality", "equals": "CT"},
                    {"attribute": "NumberOfInstances", "range": {"min": instances_per_series}},
                ],
                "action": {"model": FAULT_MODEL, "destinations": ["pacs"], "quiet_period_s": quiet_period_s},
            }
        ]
    }
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def node_extra(
    *,
    rules_file: Path,
    dicom_port: int,
    pacs_port: int,
    calling_aes: Iterable[str],
    max_associations_per_ip: int = 16,
) -> dict[str, Any]:
    """NodeProcess `extra` for the fault tests: the senders' AE titles allowed; a short worker lease (a
    job running at a kill is re-queued after 6 s, not after the default minute); the storescp destination
    without read-back (it has no C-FIND) and with a 10 s DIMSE timeout (pynetdicom's requestor can miss a
    C-STORE response, a race in its reactor, and then waits out the whole timeout before the retry)."""
    return {
        "rules_file": str(rules_file),
        "dicom": {
            "bind": "127.0.0.1",
            "port": dicom_port,
            "allowed_peers": [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in calling_aes],
            "max_associations_per_ip": max_associations_per_ip,
        },
        "destinations": [
            {
                "name": "pacs",
                "type": "dicom",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
                "verify": False,
                "timeout_s": 10,
            }
        ],
        "worker": {
            "lease_s": 6,
            "heartbeat_s": 2,
            "poll_interval_s": 0.2,
            "backoff_base_s": 0.5,
            "backoff_cap_s": 2,
        },
    }


# -- senders ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Every answer one instance got: a status, or None when the association was lost before one came."""

    answers: list[int | None] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return SUCCESS in self.answers


class SendLog:
    """What every sender sent and what the node answered, shared by all senders (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.outcomes: dict[str, Outcome] = {}
        self.instances: dict[str, Instance] = {}
        self.acknowledged = 0
        self.refusals: list[tuple[str, int]] = []  # (SOP Instance UID, failure status)

    def record(self, instance: Instance, answer: int | None) -> None:
        with self._lock:
            self.instances.setdefault(instance.sop_instance_uid, instance)
            outcome = self.outcomes.setdefault(instance.sop_instance_uid, Outcome())
            if answer == SUCCESS and not outcome.acknowledged:
                self.acknowledged += 1
            elif answer is not None and answer != SUCCESS:
                self.refusals.append((instance.sop_instance_uid, answer))
            outcome.answers.append(answer)
            self._lock.notify_all()

    def wait_for_acknowledged(self, count: int, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.acknowledged >= count, timeout_s)

    def acknowledged_instances(self) -> list[Instance]:
        with self._lock:
            return [self.instances[uid] for uid, o in self.outcomes.items() if o.acknowledged]

    @property
    def attempts(self) -> int:
        with self._lock:
            return sum(len(o.answers) for o in self.outcomes.values())

    @property
    def unanswered(self) -> int:
        """C-STOREs sent that got no answer (the node was killed before it answered)."""
        with self._lock:
            return sum(a is None for o in self.outcomes.values() for a in o.answers)


class Sender(threading.Thread):
    """A pynetdicom C-STORE SCU on its own association; re-sends an instance until it is acknowledged.

    Lost associations (the node was killed) are re-opened every RETRY_S until the node is back.
    """

    def __init__(self, name: str, calling_ae: str, called_ae: str, port: int, send_log: SendLog) -> None:
        super().__init__(name=f"sender-{name}", daemon=True)
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.port = port
        self.send_log = send_log
        self._queue: deque[Instance] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._halt = threading.Event()
        self._assoc: Association | None = None

    def enqueue(self, items: Iterable[Instance]) -> None:
        with self._cond:
            self._queue.extend(items)
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every queued instance was acknowledged within `timeout_s`."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    @property
    def pending(self) -> int:
        """Instances queued and not yet acknowledged (the one being sent is still the queue's first)."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout_s: float = 30) -> None:
        """Stop after the current instance and release the association."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._halt.set()
        self.join(timeout_s)

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                    if self._closed:
                        return
                    item = self._queue[0]
                    self._busy = True
                while not self._halt.is_set():
                    answer = self._send(item)
                    if answer == SUCCESS:
                        break
                    self._halt.wait(RETRY_S)
                with self._cond:
                    if self._queue and self._queue[0] is item and not self._halt.is_set():
                        self._queue.popleft()
                    idle = not self._queue
                if idle:
                    self._drop()  # as a modality does: release once everything queued went out
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        finally:
            self._drop()

    def _send(self, item: Instance) -> int | None:
        assoc = self._association()
        if assoc is None:
            return None  # node down: nothing was sent, nothing to record
        try:
            status = assoc.send_c_store(dcmread(item.path))
        except (RuntimeError, OSError):
            status = Dataset()
        answer = int(status.Status) if "Status" in status else None
        self.send_log.record(item, answer)
        if answer is None or not assoc.is_established:
            self._drop()
        return answer

    def _association(self) -> Association | None:
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        self._drop()
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = 30
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            return None
        self._assoc = assoc
        return assoc

    def _drop(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def start_senders(calling_aes: Sequence[str], called_ae: str, port: int, send_log: SendLog) -> list[Sender]:
    senders = [Sender(str(i), ae, called_ae, port, send_log) for i, ae in enumerate(calling_aes)]
    for sender in senders:
        sender.start()
    return senders


# -- what the node holds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    status: str
    series_instance_uid: str | None
    model: str | None
    attempts: int
    payload: dict[str, Any]
    last_error: str | None


@dataclass(frozen=True)
class SeriesState:
    status: str
    generation: int
    instance_count: int


@dataclass(frozen=True)
class NodeSnapshot:
    """The node's database rows and spool files, read from outside (SQLite in WAL mode allows it while
    the node runs; PostgreSQL always)."""

    instance_paths: dict[str, str]  # SOP Instance UID -> spool path
    instance_series: dict[str, str]  # SOP Instance UID -> Series Instance UID
    result_paths: dict[str, str]  # result SOP Instance UID -> spool path
    series: dict[str, SeriesState]
    jobs: list[JobRow]
    instance_files: frozenset[str]  # spool-relative paths under instances/
    result_files: frozenset[str]  # spool-relative paths under results/
    incoming: tuple[str, ...]  # names left in spool/incoming

    @classmethod
    def read(cls, database_url: str, spool_dir: Path) -> NodeSnapshot:
        engine = make_engine(database_url)
        try:
            with engine.connect() as conn:
                inst = conn.execute(
                    sa.select(
                        instances.c.sop_instance_uid, instances.c.series_instance_uid, instances.c.spool_path
                    )
                ).all()
                res = conn.execute(sa.select(results.c.sop_instance_uid, results.c.spool_path)).all()
                ser = conn.execute(
                    sa.select(
                        series.c.series_instance_uid,
                        series.c.status,
                        series.c.generation,
                        series.c.instance_count,
                    )
                ).all()
                job_rows = conn.execute(
                    sa.select(
                        jobs.c.id,
                        jobs.c.kind,
                        jobs.c.status,
                        jobs.c.series_instance_uid,
                        jobs.c.model,
                        jobs.c.attempts,
                        jobs.c.payload,
                        jobs.c.last_error,
                    ).order_by(jobs.c.id)
                ).all()
        finally:
            engine.dispose()
        return cls(
            instance_paths={r.sop_instance_uid: r.spool_path for r in inst},
            instance_series={r.sop_instance_uid: r.series_instance_uid for r in inst},
            result_paths={r.sop_instance_uid: r.spool_path for r in res},
            series={
                r.series_instance_uid: SeriesState(r.status, r.generation, r.instance_count) for r in ser
            },
            jobs=[
                JobRow(
                    r.id,
                    r.kind,
                    r.status,
                    r.series_instance_uid,
                    r.model,
                    r.attempts,
                    json.loads(r.payload),
                    r.last_error,
                )
                for r in job_rows
            ],
            instance_files=_spool_files(spool_dir, "instances"),
            result_files=_spool_files(spool_dir, "results"),
            incoming=tuple(sorted(p.name for p in (spool_dir / "incoming").iterdir())),
        )

    def infer_jobs(self, series_instance_uid: str) -> list[JobRow]:
        return [j for j in self.jobs if j.kind == "infer" and j.series_instance_uid == series_instance_uid]

    def deliveries_of(self, infer_job_id: int) -> list[JobRow]:
        return [j for j in self.jobs if j.kind == "deliver" and j.payload.get("infer_job_id") == infer_job_id]


def _spool_files(spool_dir: Path, area: str) -> frozenset[str]:
    root = spool_dir / area
    return frozenset(p.relative_to(spool_dir).as_posix() for p in root.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Consistency:
    """What the checks after recovery found; every list must be empty."""

    missing: list[str]  # acknowledged, but no instance row
    missing_files: list[str]  # acknowledged, row present, spool file absent
    corrupt: list[str]  # stored bytes differ from the bytes sent
    rows_without_file: list[str]  # instance or result rows whose spool file is absent
    files_without_row: list[str]  # spool files (instances/, results/) no row names
    incoming: list[str]  # partial files left in spool/incoming
    count_mismatch: list[str]  # series whose instance_count differs from its instance rows

    @property
    def ok(self) -> bool:
        return not any(
            (
                self.missing,
                self.missing_files,
                self.corrupt,
                self.rows_without_file,
                self.files_without_row,
                self.incoming,
                self.count_mismatch,
            )
        )


def check_consistency(
    snapshot: NodeSnapshot, spool_dir: Path, acknowledged: Iterable[Instance]
) -> Consistency:
    missing: list[str] = []
    missing_files: list[str] = []
    corrupt: list[str] = []
    for sent in acknowledged:
        rel = snapshot.instance_paths.get(sent.sop_instance_uid)
        if rel is None:
            missing.append(sent.sop_instance_uid)
            continue
        path = spool_dir / rel
        if not path.is_file():
            missing_files.append(sent.sop_instance_uid)
            continue
        if stored_data_set(path) != (sent.transfer_syntax_uid, sent.data_set):
            corrupt.append(sent.sop_instance_uid)
    rows = {*snapshot.instance_paths.values(), *snapshot.result_paths.values()}
    files = snapshot.instance_files | snapshot.result_files
    counts: dict[str, int] = {}
    for series_uid in snapshot.instance_series.values():
        counts[series_uid] = counts.get(series_uid, 0) + 1
    return Consistency(
        missing=missing,
        missing_files=missing_files,
        corrupt=corrupt,
        rows_without_file=sorted(r for r in rows if not (spool_dir / r).is_file()),
        files_without_row=sorted(files - rows),
        incoming=list(snapshot.incoming),
        count_mismatch=sorted(
            uid for uid, s in snapshot.series.items() if s.instance_count != counts.get(uid, 0)
        ),
    )


def unprocessed_series(snapshot: NodeSnapshot, series_uids: Iterable[str]) -> dict[str, str]:
    """Series (of `series_uids`) not fully processed at their latest generation, with the reason: routed,
    one succeeded infer job for that generation, and each of its deliveries succeeded."""
    reasons: dict[str, str] = {}
    for uid in series_uids:
        state = snapshot.series.get(uid)
        if state is None:
            reasons[uid] = "no series row"
            continue
        if state.status != "routed":
            reasons[uid] = f"series {state.status} (generation {state.generation})"
            continue
        current = [j for j in snapshot.infer_jobs(uid) if j.payload.get("generation") == state.generation]
        if len(current) != 1 or current[0].status != "succeeded":
            reasons[uid] = f"infer jobs of generation {state.generation}: {[j.status for j in current]}"
            continue
        deliveries = snapshot.deliveries_of(current[0].id)
        if not deliveries or any(d.status != "succeeded" for d in deliveries):
            reasons[uid] = f"deliveries: {[d.status for d in deliveries]}"
    return reasons


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


# -- the kill -9 scenario ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KillRound:
    """One kill: when it came (after how many acknowledgements, in total) and how long the restart took."""

    index: int
    queued: int  # instances the senders had to send when the round began (its batch and leftovers)
    acknowledged_at_start: int
    kill_after_ack: int  # the random target: kill once this many (in total) were acknowledged ...
    delay_s: float  # ... and this long after that
    acknowledged_at_kill: int
    restart_s: float

    @property
    def while_sending(self) -> bool:
        """Whether the kill came before everything the round queued was acknowledged."""
        return self.acknowledged_at_kill < self.acknowledged_at_start + self.queued


@dataclass
class KillFigures:
    rounds: list[KillRound]
    series: int
    instances: int
    send_log: SendLog
    consistency: Consistency
    unprocessed: dict[str, str]
    jobs: list[JobRow]
    recovery_s: float  # from the last restart to every series processed

    @property
    def acknowledged(self) -> int:
        return self.send_log.acknowledged


def run_kill_rounds(
    node: NodeProcess,
    plan: Sequence[Sequence[Sequence[Instance]]],
    calling_aes: Sequence[str],
    rng: random.Random,
    *,
    late_kill_fraction: float = 0.0,
    late_kill_max_s: float = 0.0,
    send_timeout_s: float = 120,
    process_timeout_s: float = 120,
) -> KillFigures:
    """Send `plan` (one batch per round) from parallel senders and kill -9 the node once per round at a
    random moment, restarting it each time; then let everything finish and check the node's state.

    A round queues its batch behind what the previous round left unacknowledged and kills after a random
    number of acknowledgements (anywhere from the first to the last instance queued) and 0-20 ms more.
    With `late_kill_fraction`, that share of the rounds waits for every instance queued and then
    0-`late_kill_max_s` s more, so the kill lands in routing, inference or delivery instead. After the
    last restart the senders re-send what is unacknowledged; the node must complete and process every
    series. The node must be started; it is stopped (SIGTERM) before the checks.
    """
    send_log = SendLog()
    senders = start_senders(calling_aes, node.ae_title, node.dicom_port, send_log)
    rounds: list[KillRound] = []
    try:
        for index, batch in enumerate(plan):
            for sender, instances_of_series in zip(senders, batch, strict=True):
                sender.enqueue(instances_of_series)
            queued = sum(s.pending for s in senders)
            at_start = send_log.acknowledged
            if rng.random() < late_kill_fraction:
                target, delay_s = at_start + queued, rng.uniform(0, late_kill_max_s)
            else:
                target, delay_s = at_start + rng.randint(1, max(1, queued)), rng.uniform(0, 0.02)
            if not send_log.wait_for_acknowledged(target, send_timeout_s):
                raise TimeoutError(f"round {index}: {send_log.acknowledged} of {target} acknowledged")
            time.sleep(delay_s)
            acknowledged_at_kill = send_log.acknowledged
            node.kill9()
            started = time.monotonic()
            node.start()
            restart_s = round(time.monotonic() - started, 2)
            rounds.append(
                KillRound(index, queued, at_start, target, round(delay_s, 3), acknowledged_at_kill, restart_s)
            )
        restarted = time.monotonic()
        for sender in senders:
            if not sender.wait_idle(send_timeout_s):
                raise TimeoutError(f"{sender.name} still has {sender.pending} unacknowledged instances")
    finally:
        for sender in senders:
            sender.close()
    series_uids = {i.series_instance_uid for batch in plan for s in batch for i in s}
    spool_dir = node.workdir / "spool"

    def processed() -> bool:
        return not unprocessed_series(NodeSnapshot.read(node.database_url, spool_dir), series_uids)

    wait_for(processed, process_timeout_s, interval_s=0.5)
    recovery_s = time.monotonic() - restarted
    node.stop()
    snapshot = NodeSnapshot.read(node.database_url, spool_dir)
    return KillFigures(
        rounds=rounds,
        series=len(series_uids),
        instances=sum(len(s) for batch in plan for s in batch),
        send_log=send_log,
        consistency=check_consistency(snapshot, spool_dir, send_log.acknowledged_instances()),
        unprocessed=unprocessed_series(snapshot, series_uids),
        jobs=snapshot.jobs,
        recovery_s=round(recovery_s, 1),
    )
