"""Scale-out shape on PostgreSQL: a receiving node (`serve --no-workers`) and a separate `worker` process
share one database and spool; a real chest CT goes in, SEG + SR reach the destination (DCMTK storescp)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai_node.devtools.datasets import lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.repo import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_receiver_and_separate_worker_on_postgresql(tmp_path: Path, postgres_database: str) -> None:
    received = tmp_path / "pacs"
    with storescp(received) as pacs_port:
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            database_url=postgres_database,
            quiet_period_s=1,
            serve_args=("--no-workers",),
            pacs_verify=False,  # storescp has no C-FIND
        )
        worker_log = open(tmp_path / "worker.log", "wb")
        worker = None
        try:
            node.start()
            worker = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node.cli", "worker", "-c", str(node.config_path)],
                cwd=ROOT,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            ct = lung_ct_series(tmp_path / "ct", "lung1")
            storescu(list(ct.paths), node.ae_title, node.dicom_port)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                jobs = node.jobs()
                if len(jobs) == 2 and all(j["status"] == "succeeded" for j in jobs):
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"jobs did not finish: {node.jobs()}\n{node.log_tail()}")
            # Both jobs ran in the worker process, not in the receiver.
            assert all(f":{worker.pid}:" in j["worker_id"] for j in jobs), [j["worker_id"] for j in jobs]
            assert node.get_json(f"/api/series/{ct.series_instance_uid}")["instance_count"] == len(ct.paths)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=40)
            node.stop()
            worker_log.close()
    modalities = sorted(dcmread(f, stop_before_pixels=True).Modality for f in received.iterdir())
    assert modalities == ["SEG", "SR"]
