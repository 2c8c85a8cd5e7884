"""A destination that is down for a while, then busy, then back: the results arrive once, after it returns;
a destination that refuses the association permanently: its delivery is dead-lettered at once.

Real peers on loopback, the node as its own process (`dicom-ai-node serve`, SQLite):
- "pacs" is first nothing at all (connection refused), then a pynetdicom SCP at its association limit
  (A-ASSOCIATE-RJ 2/3/2, rejected-transient, local limit exceeded: a busy PACS), then DCMTK storescp with
  unique file names (+uf), so a result sent twice would show up as two files;
- "refusing" is DCMTK storescp --refuse (A-ASSOCIATE-RJ rejected-permanent).
The worker-level retry, backoff, dead letter and replay against a closed port, and a rejection by the
node's own allow-list, are tests/integration/test_deliver.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicom_ai_node.devtools.dcmtk import DCMTK_ENV, dcmtk_tool, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import wait_for
from dicom_ai_node.devtools.ports import free_port, wait_port
from dicom_ai_node.devtools.synthetic import write_ct_series

pytestmark = pytest.mark.e2e

MODEL = "ct-lung-classical"
VERIFICATION = "1.2.840.10008.1.1"
MAX_ATTEMPTS = 10


@contextmanager
def _storescp(out_dir: Path, port: int, aet: str, *options: str) -> Iterator[None]:
    """DCMTK storescp on `port` with extra `options`; stopped on exit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk_tool("storescp"), "-aet", aet, "-od", str(out_dir), *options, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def _busy_pacs(port: int) -> Iterator[list[str]]:
    """A pynetdicom storage SCP allowed one association, which the test itself holds: every other
    association is rejected 2/3/2. Yields the SOP Instance UIDs it stored (must stay empty)."""
    stored: list[str] = []

    def on_store(event: Event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.maximum_associations = 1
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(VERIFICATION)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # block=False returns the running server
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(VERIFICATION)
    hold = holder.associate("127.0.0.1", port, ae_title="PACS")
    try:
        assert hold.is_established
        yield stored
    finally:
        hold.release()
        server.shutdown()


def _rules(path: Path) -> Path:
    rule = {
        "id": "ct-lungs",
        "version": 1,
        "conditions": [{"attribute": "Modality", "equals": "CT"}],
        "action": {"model": MODEL, "destinations": ["pacs", "refusing"], "quiet_period_s": 1},
    }
    path.write_text(yaml.safe_dump({"rules": [rule]}, sort_keys=False))
    return path


def test_destination_down_then_busy_then_back_gets_each_result_once_and_a_refusal_is_dead_at_once(
    tmp_path: Path,
) -> None:
    pacs_port = free_port()
    received = tmp_path / "pacs"
    refusing_port = free_port()
    with _storescp(tmp_path / "refusing", refusing_port, "REFUSING", "--refuse"):
        destination = {"type": "dicom", "host": "127.0.0.1", "timeout_s": 10, "verify": False}
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            quiet_period_s=1,
            extra={
                "rules_file": str(_rules(tmp_path / "rules.yaml")),
                "destinations": [
                    {**destination, "name": "pacs", "ae_title": "PACS", "port": pacs_port},
                    {**destination, "name": "refusing", "ae_title": "REFUSING", "port": refusing_port},
                ],
                "models": {"device": "cpu"},
                "worker": {
                    "lease_s": 20,
                    "heartbeat_s": 2,
                    "poll_interval_s": 0.2,
                    "backoff_base_s": 1,
                    "backoff_cap_s": 2,
                    "max_attempts": MAX_ATTEMPTS,
                },
            },
        )
        try:
            node.start()
            ct = write_ct_series(
                tmp_path / "ct", n_slices=8, rows=48, cols=48, pixel_spacing=(6.0, 6.0), slice_thickness=10.0
            )
            storescu(ct, node.ae_title, node.dicom_port)
            sent_at = time.monotonic()

            def delivery(name: str) -> dict[str, Any] | None:
                jobs = node.jobs(kind="deliver")
                return next((j for j in jobs if j["payload"]["destination"] == name), None)

            def state(name: str, status: str, attempts: int = 1, error: str = "") -> dict[str, Any] | None:
                job = delivery(name)
                ok = (
                    job is not None
                    and job["status"] == status
                    and job["attempts"] >= attempts
                    and error in (job["last_error"] or "")
                )
                return job if ok else None

            # Permanent refusal: dead at its first attempt, with the peer's reason.
            refused = wait_for(lambda: state("refusing", "dead"), 120, 0.1, f"refusal\n{node.log_tail()}")
            # Down (connection refused): retried with backoff.
            down = wait_for(
                lambda: state("pacs", "failed", 2, "cannot associate"), 60, 0.1, f"retries\n{node.log_tail()}"
            )
            # Busy: rejected-transient is retried too (it was dead-lettered at once before).
            with _busy_pacs(pacs_port) as stored_while_busy:
                busy = wait_for(
                    lambda: state("pacs", "failed", down["attempts"] + 1, "rejected transient"),
                    60,
                    0.1,
                    f"a transient rejection\n{node.log_tail()}",
                )
            with _storescp(received, pacs_port, "PACS", "+uf"):
                back_at = time.monotonic()
                done = wait_for(lambda: state("pacs", "succeeded"), 60, 0.1, f"delivery\n{node.log_tail()}")
                delivered_after_s = time.monotonic() - back_at
                time.sleep(1)  # anything sent twice would arrive now
            infer = node.jobs(kind="infer")
        finally:
            node.stop()

    assert refused["attempts"] == 1, refused
    assert refused["last_error"].startswith("PermanentDeliveryError: association rejected by REFUSING@")
    assert "rejected permanent" in refused["last_error"], refused["last_error"]
    assert busy["last_error"].startswith("TransientDeliveryError: association rejected by PACS@")
    assert "local limit exceeded (2/3/2)" in busy["last_error"], busy["last_error"]
    assert stored_while_busy == []
    # The outage re-ran only the delivery: one inference, attempted once.
    assert [(j["status"], j["attempts"]) for j in infer] == [("succeeded", 1)]
    # Each result exactly once at the destination (storescp +uf writes every C-STORE to a new file).
    files = [dcmread(f, stop_before_pixels=True) for f in received.iterdir()]
    assert Counter(ds.Modality for ds in files) == {"SEG": 1, "SR": 1}
    assert sorted(str(ds.SOPInstanceUID) for ds in files) == sorted(infer[0]["result"]["sop_instance_uids"])
    assert len(done["result"]["sent"]) == 2
    figures = {
        "refusing": {"attempts": refused["attempts"], "last_error": refused["last_error"]},
        "pacs_attempts": done["attempts"],
        "pacs_unavailable_after_sent_s": round(back_at - sent_at, 1),
        "delivered_after_back_s": round(delivered_after_s, 2),
        "busy_error": busy["last_error"],
    }
    print("FIGURES destination", json.dumps(figures))
