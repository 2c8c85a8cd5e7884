"""kill -9 of the node at random moments under four parallel senders loses nothing it acknowledged and
leaves no file without its row; the same study sent by several senders several times is stored once and
processed once; the orphan sweep at start tells a killed writer's file from a live one's.

The longer run of the first test is scripts/fault_soak.py (docs/reliability.md, "Faults").
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_ai_node.devtools.dcmtk import storescp
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.store.spool import Spool
from tests.support.faults import (
    FAULT_MODEL,
    SUCCESS,
    Instance,
    NodeSnapshot,
    SendLog,
    check_consistency,
    ct_series,
    fault_rules_file,
    node_extra,
    plan_batches,
    run_kill_rounds,
    start_senders,
    unprocessed_series,
    wait_for,
)

pytestmark = pytest.mark.e2e

SENDERS = ("MODALITY1", "MODALITY2", "MODALITY3", "MODALITY4")
ROUNDS = 3
INSTANCES_PER_SERIES = 16
SEED = 20261203

# A writer in another process: moves a temp file into the spool under its lock (as ingest_file does), says
# where, and waits there, between its rename and its database commit, until it is killed.
_WRITER = """
import sys, time
from pathlib import Path
from dicom_ai_node.store.spool import Spool
spool = Spool(Path(sys.argv[1]))
with spool.held(Path(sys.argv[2])) as local:
    print(spool.commit_file(local), flush=True)
    time.sleep(600)
"""


def test_kill9_at_random_moments_under_parallel_senders_loses_nothing(tmp_path: Path) -> None:
    plan = plan_batches(
        tmp_path / "sent", batches=ROUNDS, senders=len(SENDERS), instances_per_series=INSTANCES_PER_SERIES
    )
    rules = fault_rules_file(tmp_path / "rules.yaml", INSTANCES_PER_SERIES)
    port = free_port()
    with storescp(tmp_path / "pacs") as pacs_port:
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            dicom_port=port,
            quiet_period_s=1,
            pacs_verify=False,  # storescp has no C-FIND
            extra=node_extra(rules_file=rules, dicom_port=port, pacs_port=pacs_port, calling_aes=SENDERS),
        )
        try:
            node.start()
            figures = run_kill_rounds(node, plan, SENDERS, random.Random(SEED))
        finally:
            node.stop()

    log_tail = node.log_tail()
    sent = figures.send_log
    assert len(figures.rounds) == ROUNDS
    # Every instance ended acknowledged (the senders re-sent what a kill cut off), and the node never
    # refused one: a kill ends the process, it does not make it answer a failure.
    assert sent.acknowledged == figures.instances == ROUNDS * len(SENDERS) * INSTANCES_PER_SERIES
    assert sent.refusals == []
    c = figures.consistency
    assert c.missing == [] and c.missing_files == [], log_tail
    assert c.corrupt == []  # byte for byte what was sent
    assert c.rows_without_file == [] and c.files_without_row == [], log_tail
    assert c.incoming == [] and c.count_mismatch == []
    # Every series complete and processed at its latest generation after the last restart; no job
    # anywhere left dead, failed or unfinished.
    assert figures.unprocessed == {}, (figures.unprocessed, log_tail)
    assert Counter(j.status for j in figures.jobs).keys() == {"succeeded"}, [
        (j.kind, j.status, j.last_error) for j in figures.jobs if j.status != "succeeded"
    ]


def _send_concurrently(
    node: NodeProcess, calling_aes: tuple[str, ...], study: list[Instance], send_log: SendLog, passes: int
) -> None:
    """Each calling AE sends the whole study `passes` times, each pass on its own association, all at once."""
    senders = start_senders(
        [ae for ae in calling_aes for _ in range(passes)], node.ae_title, node.dicom_port, send_log
    )
    try:
        for sender in senders:
            sender.enqueue(study)
        for sender in senders:
            assert sender.wait_idle(120), f"{sender.name}: {sender.pending} instances unacknowledged"
    finally:
        for sender in senders:
            sender.close()


def test_same_study_from_several_senders_several_times_is_stored_and_processed_once(tmp_path: Path) -> None:
    n = 12
    study_uid = generate_uid()
    study = [
        *ct_series(tmp_path / "s1", n, study_instance_uid=study_uid, series_number=1),
        *ct_series(tmp_path / "s2", n, study_instance_uid=study_uid, series_number=2),
    ]
    series_uids = {i.series_instance_uid for i in study}
    senders = ("PACS_A", "PACS_B", "MODALITY", "ROUTER")
    rules = fault_rules_file(tmp_path / "rules.yaml", n)
    port = free_port()
    received = tmp_path / "pacs"
    send_log = SendLog()
    with storescp(received) as pacs_port:
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            dicom_port=port,
            quiet_period_s=1,
            pacs_verify=False,
            extra=node_extra(rules_file=rules, dicom_port=port, pacs_port=pacs_port, calling_aes=senders),
        )
        spool_dir = node.workdir / "spool"

        def snapshot() -> NodeSnapshot:
            return NodeSnapshot.read(node.database_url, spool_dir)

        try:
            node.start()
            # Four calling AEs at once, each sending the whole study twice over on two associations.
            _send_concurrently(node, senders, study, send_log, passes=2)
            assert wait_for(lambda: not unprocessed_series(snapshot(), series_uids), 120), (
                unprocessed_series(snapshot(), series_uids),
                node.log_tail(),
            )
            # Once more after the results went out (a PACS forwarding the study again): kept once, and no
            # new job after the quiet period (1 s) and a few completion sweeps (every 0.5 s).
            _send_concurrently(node, senders, study, send_log, passes=1)
            time.sleep(2.5)
        finally:
            node.stop()

    # 12 stores of each instance (4 AEs x 3 passes), each answered Success.
    assert {uid: o.answers for uid, o in send_log.outcomes.items()} == {
        i.sop_instance_uid: [SUCCESS] * 12 for i in study
    }
    after = snapshot()
    assert sorted(after.instance_paths) == sorted(i.sop_instance_uid for i in study)  # one row each
    assert len(after.instance_files) == len(study)  # one stored copy each
    assert check_consistency(after, spool_dir, study).ok
    assert {uid: (s.instance_count, s.generation) for uid, s in after.series.items()} == dict.fromkeys(
        series_uids, (n, 1)
    )
    assert unprocessed_series(after, series_uids) == {}
    infer = Counter((j.series_instance_uid, j.model) for j in after.jobs if j.kind == "infer")
    assert infer == dict.fromkeys(((uid, FAULT_MODEL) for uid in series_uids), 1)
    deliver = Counter(j.payload["series_instance_uid"] for j in after.jobs if j.kind == "deliver")
    assert deliver == dict.fromkeys(series_uids, 1)
    assert {j.status for j in after.jobs} == {"succeeded"}
    # The destination got one SEG and one SR per series (storescp names its files by SOP Instance UID).
    modalities = Counter(dcmread(f, stop_before_pixels=True).Modality for f in received.iterdir())
    assert modalities == {"SEG": len(series_uids), "SR": len(series_uids)}


def test_orphan_sweep_keeps_a_live_writers_file_and_removes_a_killed_ones(tmp_path: Path) -> None:
    """Spool.remove_orphans, run at every start, against writers in other processes sharing the spool."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    create_schema(engine)
    repo, spool = SeriesRepository(engine), Spool(tmp_path / "spool")

    def sweep() -> int:
        return spool.remove_orphans(repo.instance_spool_paths, repo.has_instance_file)

    def writer(name: str) -> tuple[subprocess.Popen[str], Path]:
        temp = spool.incoming / name
        temp.write_bytes(b"DICM" * 64)
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(spool.root), str(temp)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        return proc, spool.root / proc.stdout.readline().strip()

    # A file with its row (committed by a writer that has finished) stays.
    recorded_temp = spool.incoming / "recorded.part"
    recorded_temp.write_bytes(b"DICM" * 64)
    with spool.held(recorded_temp) as local:
        rel = spool.commit_file(local)
        repo.record_instance(
            InstanceRecord(
                "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2", "1.2.840.10008.1.2.1", rel, 256
            )
        )
    alive, alive_file = writer("alive.part")
    killed, killed_file = writer("killed.part")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        # The killed writer's file goes; the live writer's (between its rename and its commit) and the
        # recorded one stay.
        assert sweep() == 1
        assert not killed_file.exists() and alive_file.exists() and (spool.root / rel).exists()
    finally:
        for proc in (alive, killed):
            proc.kill()
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
    # Once the live writer is dead too (no commit came), its file is an orphan as well.
    assert sweep() == 1 and not alive_file.exists() and (spool.root / rel).exists()
    engine.dispose()
