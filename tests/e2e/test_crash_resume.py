"""kill -9 the node in the middle of an inference; after a restart the study is processed and delivered,
and the destination holds exactly one SEG and one SR (deterministic UIDs), with nothing lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai_node.devtools.datasets import ch2_mr_series
from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess

pytestmark = pytest.mark.e2e


def _wait(predicate, timeout_s: float, what: str, node: NodeProcess) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{node.log_tail()}")


def test_kill9_during_inference_then_restart_delivers_exactly_once(tmp_path: Path) -> None:
    received = tmp_path / "pacs"
    worker = {"lease_s": 6, "heartbeat_s": 2, "poll_interval_s": 0.2, "backoff_base_s": 1, "backoff_cap_s": 5}
    with storescp(received) as pacs_port:
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            quiet_period_s=1,
            extra={"worker": worker},
            pacs_verify=False,  # storescp has no C-FIND
        )
        try:
            node.start()
            mr = ch2_mr_series(tmp_path / "mr")
            storescu(list(mr.paths), node.ae_title, node.dicom_port)

            def infer_running() -> bool:
                return any(j["kind"] == "infer" and j["status"] == "running" for j in node.jobs())

            _wait(infer_running, 120, "the infer job to start", node)
            node.kill9()  # no cleanup, no goodbye: the lease is left to expire

            node.start()

            def all_done() -> bool:
                jobs = node.jobs()
                return len(jobs) >= 2 and all(j["status"] == "succeeded" for j in jobs)

            _wait(all_done, 240, "all jobs to succeed after the restart", node)
            series = node.get_json(f"/api/series/{mr.series_instance_uid}")
            assert series["instance_count"] == len(mr.paths)  # every acknowledged instance survived
            infer = [j for j in node.jobs() if j["kind"] == "infer"]
            # Claimed once before the kill, once more after its lease expired and it was re-queued.
            assert len(infer) == 1 and infer[0]["attempts"] == 2
        finally:
            node.stop()
    modalities = sorted(dcmread(f, stop_before_pixels=True).Modality for f in received.iterdir())
    assert modalities == ["SEG", "SR"], modalities
