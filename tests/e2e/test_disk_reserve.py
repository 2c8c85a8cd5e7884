"""The spool's disk under its reserve: C-STORE is refused with 0xA700 and nothing is stored, /readyz says
not ready (503) while /healthz stays alive, and intake resumes by itself when the space comes back.

Honest simulation on the real file system: the node's `disk_reserve_mb` is set a little under the free
space of the spool's file system, then a filler file in that file system (blocks really allocated, as
`fallocate` does) takes the free space under the reserve, and is deleted again. The margins are wide
enough for other processes writing to the same disk meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.synthetic import write_ct_series

pytestmark = pytest.mark.e2e

MIB = 2**20
# The reserve sits this far under the free space at start; the filler is twice as large, so the free
# space ends this far under the reserve. Either side tolerates other writers of that much meanwhile.
MARGIN = 256 * MIB
SUCCESS = 0x0000
VERIFICATION = "1.2.840.10008.1.1"


def _fill(path: Path, size: int) -> None:
    """Allocate `size` bytes of real blocks (fallocate); write them where the file system cannot."""
    with open(path, "wb") as out:
        try:
            os.posix_fallocate(out.fileno(), 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            chunk = bytes(16 * MIB)
            for _ in range(size // len(chunk)):
                out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _probe(node: NodeProcess, path: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of an open probe, 503 included."""
    try:
        with urllib.request.urlopen(node.http_url + path, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Scu:
    """One pynetdicom association to the node, as a modality holds it."""

    def __init__(self, node: NodeProcess) -> None:
        ae = AE(ae_title="STORESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(VERIFICATION)
        self.assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=node.ae_title)
        assert self.assoc.is_established

    def store(self, ds: Dataset) -> int:
        return int(self.assoc.send_c_store(ds).Status)

    def echo(self) -> int:
        return int(self.assoc.send_c_echo().Status)

    def release(self) -> None:
        self.assoc.release()


def test_disk_under_reserve_refuses_a7xx_readyz_503_and_intake_resumes_by_itself(tmp_path: Path) -> None:
    ct = [dcmread(p) for p in write_ct_series(tmp_path / "ct", n_slices=4, rows=32, cols=32)]
    series_uid = str(ct[0].SeriesInstanceUID)
    filler = tmp_path / "filler.bin"  # tmp_path holds the spool: the same file system
    spool = tmp_path / "node" / "spool"
    reserve = (shutil.disk_usage(tmp_path).free - MARGIN) // MIB * MIB
    node = NodeProcess(
        tmp_path / "node",
        pacs_aet="PACS",
        pacs_port=free_port(),
        quiet_period_s=60,  # nothing to route: this test is about intake
        extra={"disk_reserve_mb": reserve // MIB},
    )
    figures: dict[str, Any] = {"reserve_mib": reserve // MIB}
    try:
        node.start()
        scu = Scu(node)
        assert scu.store(ct[0]) == SUCCESS
        assert _probe(node, "/readyz")[0] == 200

        started = time.monotonic()
        _fill(filler, 2 * MARGIN)
        figures["filler_s"] = round(time.monotonic() - started, 2)
        free = shutil.disk_usage(spool).free
        assert free < reserve, (free, reserve)
        figures["free_under_reserve_mib"] = (reserve - free) // MIB

        # Full: refused with 0xA7xx on the open association, nothing of it kept.
        status = scu.store(ct[1])
        assert 0xA700 <= status <= 0xA7FF, hex(status)
        figures["refused_status"] = f"0x{status:04X}"
        assert scu.echo() == SUCCESS  # the association and the node are fine
        ready_status, ready = _probe(node, "/readyz")
        assert ready_status == 503 and ready["status"] == "not ready", ready
        assert ready["checks"]["spool"]["ok"] is False and "reserve" in ready["checks"]["spool"]["detail"], (
            ready
        )
        assert ready["checks"]["database"]["ok"] is True
        figures["readyz_detail"] = ready["checks"]["spool"]["detail"]
        health_status, health = _probe(node, "/healthz")
        assert health_status == 200 and health["status"] == "ok"
        assert node.get_json(f"/api/series/{series_uid}")["instance_count"] == 1
        assert list((spool / "incoming").iterdir()) == []

        # A modality that re-sends what was refused (as senders do) gets through once the space is back,
        # without anyone touching the node.
        answers: list[tuple[float, int]] = []

        def resend() -> None:
            sender = Scu(node)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    answer = sender.store(ct[1])
                    answers.append((time.monotonic(), answer))
                    if answer == SUCCESS:
                        return
                    time.sleep(0.1)
            finally:
                sender.release()

        resender = threading.Thread(target=resend)
        resender.start()
        time.sleep(1.0)
        filler.unlink()
        freed_at = time.monotonic()
        resender.join(70)
        assert answers and answers[-1][1] == SUCCESS, answers
        refused_before = [a for t, a in answers if t < freed_at]
        assert refused_before and all(0xA700 <= a <= 0xA7FF for a in refused_before), answers
        figures["resend_refusals"] = len(refused_before)
        figures["success_after_space_back_s"] = round(answers[-1][0] - freed_at, 2)

        assert scu.store(ct[2]) == SUCCESS  # the first association carries on too
        assert _probe(node, "/readyz")[0] == 200
        scu.release()
        series = node.get_json(f"/api/series/{series_uid}")
        assert series["instance_count"] == 3
        assert node.running
    finally:
        filler.unlink(missing_ok=True)
        node.stop()
    print("FIGURES disk-reserve", json.dumps(figures))
