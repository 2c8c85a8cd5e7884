"""PostgreSQL restarted under load: nothing acknowledged is lost, C-STOREs while it is down are refused
(never answered Success), and the workers resume and finish every job once it is back.

A private PostgreSQL cluster (tests/support/private_postgres.py) on its own port, never the shared one;
the node as its own process (`dicom-ai-node serve`) on it; three pynetdicom senders (tests/support/
faults.py) that re-send an instance until it is acknowledged, as modalities do. Two restarts mid-load:
`pg_ctl restart -m fast` as is, then the same in two steps (stop -m fast, 3 s down, start) so that the
outage spans many C-STOREs and the refusals can be checked against a known window.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_ai_node.devtools.dcmtk import storescp
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from tests.support.faults import (
    SUCCESS,
    Instance,
    NodeSnapshot,
    SendLog,
    check_consistency,
    ct_series,
    fault_rules_file,
    node_extra,
    start_senders,
    unprocessed_series,
    wait_for,
)
from tests.support.private_postgres import private_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SENDERS = ("MODALITY1", "MODALITY2", "MODALITY3")
BATCHES = 3
INSTANCES_PER_SERIES = 10
DOWN_S = 3.0
# Answers this long after the server was seen stopped count as "during the outage": an instance committed
# just before the stop may still be answered Success a moment later.
SETTLE_S = 0.5
VERIFICATION = "1.2.840.10008.1.1"


class TimedSendLog(SendLog):
    """SendLog that also keeps when each answer arrived (time.monotonic())."""

    def __init__(self) -> None:
        super().__init__()
        self.timeline: list[tuple[float, int | None]] = []

    def record(self, instance: Instance, answer: int | None) -> None:
        super().record(instance, answer)
        self.timeline.append((time.monotonic(), answer))


def _probe(node: NodeProcess, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(node.http_url + path, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _echo(node: NodeProcess) -> int:
    ae = AE(ae_title=SENDERS[0])
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _batch(directory: Path, b: int) -> list[list[Instance]]:
    study = generate_uid()
    return [
        ct_series(
            directory / f"b{b}s{s}", INSTANCES_PER_SERIES, study_instance_uid=study, series_number=10 * b + s
        )
        for s in range(len(SENDERS))
    ]


def test_postgres_restarted_under_load_loses_nothing_and_workers_resume(tmp_path: Path) -> None:
    plan = [_batch(tmp_path / "sent", b) for b in range(BATCHES)]
    per_batch = len(SENDERS) * INSTANCES_PER_SERIES
    rules = fault_rules_file(tmp_path / "rules.yaml", INSTANCES_PER_SERIES)
    send_log = TimedSendLog()
    figures: dict[str, Any] = {}
    with private_postgres(tmp_path) as pg, storescp(tmp_path / "pacs") as pacs_port:
        port = free_port()
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            dicom_port=port,
            database_url=pg.create_database("ainode"),
            quiet_period_s=1,
            pacs_verify=False,  # storescp has no C-FIND
            extra={
                **node_extra(rules_file=rules, dicom_port=port, pacs_port=pacs_port, calling_aes=SENDERS),
                "models": {"device": "cpu"},
            },
        )
        spool_dir = node.workdir / "spool"
        senders = []
        try:
            node.start()
            senders = start_senders(SENDERS, node.ae_title, node.dicom_port, send_log)

            def enqueue(b: int) -> None:
                for sender, series in zip(senders, plan[b], strict=True):
                    sender.enqueue(series)

            def running_jobs() -> list[dict[str, Any]]:
                return node.jobs(status="running")

            # 1: `pg_ctl restart -m fast` while the second batch arrives and the first one's series are
            # being inferred.
            enqueue(0)
            assert send_log.wait_for_acknowledged(per_batch, 60), node.log_tail()
            assert wait_for(lambda: bool(running_jobs()), 60, interval_s=0.1), node.log_tail()
            enqueue(1)
            assert send_log.wait_for_acknowledged(per_batch + per_batch // 3, 60), node.log_tail()
            started = time.monotonic()
            pg.restart("fast")
            figures["restart_s"] = round(time.monotonic() - started, 2)
            refusals_after_restart = len(send_log.refusals)

            # 2: the same in two steps, down for DOWN_S, with jobs running and the third batch arriving.
            assert send_log.wait_for_acknowledged(2 * per_batch, 60), node.log_tail()
            assert wait_for(lambda: bool(running_jobs()), 60, interval_s=0.1), node.log_tail()
            enqueue(2)
            assert send_log.wait_for_acknowledged(2 * per_batch + 3, 60), node.log_tail()
            interrupted = {j["id"]: f"{j['kind']} (attempt {j['attempts']})" for j in running_jobs()}
            pg.stop("fast")
            down_at = time.monotonic()
            time.sleep(DOWN_S / 2)
            ready_while_down = _probe(node, "/readyz")
            health_while_down = _probe(node, "/healthz")
            time.sleep(DOWN_S / 2)
            up_at = time.monotonic()
            pg.start()
            back_at = time.monotonic()

            for sender in senders:
                assert sender.wait_idle(90), (
                    f"{sender.name}: {sender.pending} unacknowledged\n{node.log_tail()}"
                )
            all_acknowledged_s = time.monotonic() - back_at
            series_uids = {i.series_instance_uid for batch in plan for s in batch for i in s}

            def snapshot() -> NodeSnapshot:
                return NodeSnapshot.read(node.database_url, spool_dir)

            processed = wait_for(lambda: not unprocessed_series(snapshot(), series_uids), 150, interval_s=0.5)
            figures["all_processed_after_back_s"] = round(time.monotonic() - back_at, 1)
            assert processed, (unprocessed_series(snapshot(), series_uids), node.log_tail())
            assert node.running, node.log_tail()  # the node process never died
            assert _echo(node) == SUCCESS
            assert _probe(node, "/readyz")[0] == 200
        finally:
            for sender in senders:
                sender.close()
            node.stop()
        after = snapshot()

    # Nothing acknowledged is lost: every instance answered Success has its row and its file, byte for byte.
    assert send_log.acknowledged == BATCHES * per_batch
    consistency = check_consistency(after, spool_dir, send_log.acknowledged_instances())
    assert consistency.ok, consistency
    # While the server was down, no C-STORE was answered Success: each got a failure status (0xA7xx, out
    # of resources: the sender may retry), and the senders' retries went through once it was back.
    during = [answer for t, answer in send_log.timeline if down_at + SETTLE_S <= t <= up_at]
    assert during, "no C-STORE was answered during the outage"
    assert all(answer is not None and 0xA700 <= answer <= 0xA7FF for answer in during), Counter(during)
    assert all(0xA700 <= status <= 0xA7FF for _, status in send_log.refusals), send_log.refusals
    # /readyz told the orchestrator (database), /healthz kept saying the process is alive.
    assert ready_while_down[0] == 503 and ready_while_down[1]["checks"]["database"]["ok"] is False
    assert health_while_down[0] == 200
    # The outage is logged once per loop and restart, not as a traceback per poll (a 3 s outage wrote
    # about 7,000 lines before): no traceback at all, and a line for each loop when the database is back.
    log_lines = node.log_path.read_text(errors="replace").splitlines()
    assert not [line for line in log_lines if line.startswith("Traceback")], node.log_tail(100)
    outage_lines = [line for line in log_lines if "retrying until it is back" in line]
    back_lines = [line for line in log_lines if "database back after" in line]
    assert 1 <= len(outage_lines) <= 2 * 8 and len(back_lines) == len(outage_lines), outage_lines
    # The workers resumed: every job of every series succeeded, none dead or stuck, the ones running when
    # the server went down included.
    assert interrupted, "no job was running just before the server went down"
    assert all(j.status == "succeeded" for j in after.jobs if j.id in interrupted)
    assert {j.status for j in after.jobs} == {"succeeded"}, [
        (j.kind, j.status, j.last_error) for j in after.jobs
    ]
    figures.update(
        {
            "instances": BATCHES * per_batch,
            "c_stores": send_log.attempts,
            "refused_at_restart": refusals_after_restart,
            "refused_total": len(send_log.refusals),
            "answered_during_outage": len(during),
            "statuses_during_outage": {f"0x{a:04X}": n for a, n in Counter(during).items() if a is not None},
            "down_s": round(up_at - down_at, 2),
            "start_s": round(back_at - up_at, 2),
            "all_acknowledged_after_back_s": round(all_acknowledged_s, 1),
            "running_just_before_stop": interrupted,
            "rerun_jobs": [f"{j.kind} {j.id}" for j in after.jobs if j.attempts > 1],
            "outage_log_lines": len(outage_lines) + len(back_lines),
            "node_log_lines": len(log_lines),
            "job_attempts": dict(Counter(f"{j.kind}:{j.attempts}" for j in after.jobs)),
        }
    )
    print("FIGURES postgres-restart", json.dumps(figures))
