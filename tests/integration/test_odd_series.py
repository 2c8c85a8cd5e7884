"""Odd series through one in-process node: the real SCP, the completion sweep with routing rules, the
worker threads with the inference host (two tiny models in its child process) and a DCMTK storescp as
the PACS (issue 12, "Bad input" at the series level; corpus in tests/support/odd_series.py).

The whole corpus is sent once, each series on its own association in the transfer syntax its files are
written in; then every entry must have its outcome: refused at receive with its named status (nothing
stored), results delivered, or the infer job dead on its first attempt with a reason naming what is wrong.
Afterwards the node still answers C-ECHO and processes a good series, and nothing is left behind: no
temp file in spool/incoming, no spool file without its row, no row without its file, no transfer file
of the inference host, and no crash (traceback) in the log.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE, _config

from dicom_ai_node.config import AllowedPeer, Destination, NodeSettings
from dicom_ai_node.devtools.dcmtk import storescp
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.node import Services, build_services, build_workers, seed_rules, start_worker_threads
from dicom_ai_node.persistence.queue import Job
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.route.completion import CompletionSweep
from tests.support.odd_series import (
    CORPUS,
    GANTRY_TILT_DEG,
    STEP_MM,
    OddSeries,
    build_corpus,
    odd_registry,
    rules_yaml,
    transfer_syntax_of,
)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# Routing waits until a whole batch is sent (`OddNode.routing`), so the quiet period only has to cover
# the gaps between instances of one association on a busy machine.
QUIET_S = 1.0
# Each series needs its quiet period, one inference and a delivery; generous for 2 busy cores.
SETTLE_S = 150.0
# FAILED is not final: the job is retried after its backoff.
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class OddNode:
    settings: NodeSettings
    services: Services
    scp: StorageSCP
    pacs_dir: Path
    transfer_dir: Path
    log: _Records
    routing: threading.Event  # the completion sweep runs while set

    @contextmanager
    def routing_held(self) -> Iterator[None]:
        """No routing while the block sends: each series is routed whole, whatever the machine's load,
        and no deliver job can run while `_send` has pynetdicom's process-wide chunked-send switch on."""
        self.routing.clear()
        try:
            yield
        finally:
            self.routing.set()

    def jobs_of(self, series_instance_uid: str, kind: JobKind) -> list[Job]:
        return [
            job
            for job in self.services.queue.list_jobs(kind=kind, limit=1000)
            if job.payload.get("series_instance_uid") == series_instance_uid
        ]


@dataclass
class Outcome:
    entry: OddSeries
    statuses: list[int]
    infer: list[Job]
    deliver: list[Job]
    delivered: list[Dataset]


def _sweep_until(stop: threading.Event, routing: threading.Event, sweep: CompletionSweep) -> None:
    while not stop.wait(0.1):
        if not routing.is_set():
            continue
        try:
            sweep.run_once()
        except Exception:  # noqa: BLE001 - the node's scheduler guards its sweeps the same way
            logging.getLogger(__name__).exception("completion sweep failed")


@pytest.fixture(scope="module")
def odd_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OddNode]:
    root = tmp_path_factory.mktemp("odd-node")
    rules = root / "rules.yaml"
    rules.write_text(rules_yaml("pacs", QUIET_S))
    records = _Records()
    logging.getLogger().addHandler(records)
    with storescp(root / "pacs") as pacs_port:
        settings = NodeSettings(
            ae_title="AINODE",
            dicom={
                "bind": "127.0.0.1",
                "port": free_port(),
                "allowed_peers": [AllowedPeer(ae_title="ODDSCU", hosts=["127.0.0.1"])],
            },
            spool_dir=root / "spool",
            database_url=f"sqlite:///{root / 'node.db'}",
            disk_reserve_mb=0,
            quiet_period_s=QUIET_S,
            rules_file=rules,
            destinations=[
                Destination(
                    name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port, timeout_s=30, verify=False
                )
            ],
            # Retries come fast, and every infer job must finish on its first attempt: an unexpected
            # exception (retried as transient) cannot pass for a precise permanent refusal. A delivery
            # may be retried: the PACS is a real process on a busy machine.
            worker={
                "lease_s": 60,
                "heartbeat_s": 5,
                "poll_interval_s": 0.1,
                "max_attempts": 3,
                "backoff_base_s": 0.5,
                "backoff_cap_s": 2,
            },
        )
        services = build_services(settings, odd_registry(), migrate="upgrade")
        assert seed_rules(services) == 2
        metrics = NodeMetrics()
        scp = StorageSCP(settings, services.spool, services.repo, metrics)
        transfer_dir = root / "transfer"
        transfer_dir.mkdir()
        stop, routing = threading.Event(), threading.Event()
        with InferenceHost(
            "cpu", [], timeout_s=60, registry_factory=odd_registry, transfer_dir=transfer_dir
        ) as host:
            workers = build_workers(
                services, [JobKind.INFER, JobKind.DELIVER], inference=host, metrics=metrics
            )
            sweep = CompletionSweep(
                services.repo,
                services.queue,
                services.rules,
                QUIET_S,
                max_attempts=settings.worker.max_attempts,
            )
            threads = start_worker_threads(workers, stop)
            threads.append(threading.Thread(target=_sweep_until, args=(stop, routing, sweep), name="sweep"))
            threads[-1].start()
            scp.start()
            try:
                yield OddNode(settings, services, scp, root / "pacs", transfer_dir, records, routing)
            finally:
                scp.stop()
                stop.set()
                for thread in threads:
                    thread.join(timeout=60)
                logging.getLogger().removeHandler(records)
                services.engine.dispose()


def _send(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file as written (chunked: its own bytes, in its own transfer syntax) on one association."""
    ae = AE(ae_title="ODDSCU")
    for sop_class, syntax in {
        (str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID), transfer_syntax_of(p)) for p in files
    }:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


def _settled(node: OddNode, series_instance_uid: str) -> tuple[list[Job], list[Job]] | None:
    """(infer jobs, deliver jobs) once the series' infer job and its deliveries are finished, else None."""
    infer = node.jobs_of(series_instance_uid, JobKind.INFER)
    if not infer or any(job.status not in TERMINAL for job in infer):
        return None
    deliver = node.jobs_of(series_instance_uid, JobKind.DELIVER)
    expected = sum(
        len(job.payload.get("destinations", [])) for job in infer if job.status == JobStatus.SUCCEEDED
    )
    if len(deliver) < expected or any(job.status not in TERMINAL for job in deliver):
        return None
    return infer, deliver


def _wait_settled(node: OddNode, series: list[str]) -> dict[str, tuple[list[Job], list[Job]]]:
    settled: dict[str, tuple[list[Job], list[Job]]] = {}
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and len(settled) < len(series):
        for uid in series:
            if uid not in settled and (done := _settled(node, uid)) is not None:
                settled[uid] = done
        time.sleep(0.2)
    missing = [uid for uid in series if uid not in settled]
    assert not missing, f"not settled in {SETTLE_S} s: {missing}"
    return settled


def _wait_for_generation(node: OddNode, series_instance_uid: str, generation: int) -> None:
    """Until the sweep has routed `generation` of the series (an infer job for it exists)."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        jobs = node.jobs_of(series_instance_uid, JobKind.INFER)
        if any(job.payload.get("generation") == generation for job in jobs):
            return
        time.sleep(0.2)
    raise AssertionError(f"series {series_instance_uid} generation {generation} not routed in {SETTLE_S} s")


def _delivered(node: OddNode) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in node.pacs_dir.iterdir())}


@pytest.fixture(scope="module")
def outcomes(odd_node: OddNode, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    corpus = build_corpus(tmp_path_factory.mktemp("odd-corpus"))
    with odd_node.routing_held():
        statuses = {entry.name: _send(odd_node.scp.port, entry.files) for entry in corpus}
    stored = [e.series_instance_uid for e in corpus if e.outcome != "refused"]
    settled = _wait_settled(odd_node, stored)
    delivered = _delivered(odd_node)
    result: dict[str, Outcome] = {}
    for entry in corpus:
        # A refused entry may share its series with a stored one (pydicom's MR files do): no jobs of its own.
        infer, deliver = settled[entry.series_instance_uid] if entry.outcome != "refused" else ([], [])
        sent = {uid for job in infer if job.result for uid in job.result.get("sop_instance_uids", [])}
        result[entry.name] = Outcome(
            entry, statuses[entry.name], infer, deliver, [ds for uid, ds in delivered.items() if uid in sent]
        )
    return result


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_odd_series_gets_its_outcome(name: str, outcomes: dict[str, Outcome], odd_node: OddNode) -> None:
    outcome = outcomes[name]
    entry = outcome.entry
    assert outcome.statuses == [entry.status] * len(entry.files), [f"0x{s:04X}" for s in outcome.statuses]
    row = odd_node.services.repo.get_series(entry.series_instance_uid)
    if entry.outcome == "refused":
        # pydicom's MR_truncated.dcm shares its series (and instance) with MR_small_bigendian.dcm: only
        # the other entry's instances may be stored.
        others = [o.entry for o in outcomes.values() if o.entry.outcome != "refused" and o is not outcome]
        stored = sum(len(e.files) for e in others if e.series_instance_uid == entry.series_instance_uid)
        assert (row.instance_count if row else 0) == stored
        return
    assert row is not None and row.instance_count == len(entry.files)
    [infer] = outcome.infer
    if entry.outcome == "dead":
        assert infer.status == JobStatus.DEAD and infer.attempts == 1, (infer.status, infer.last_error)
        error = infer.last_error or ""
        assert re.search(entry.reason, error), error
        assert entry.series_instance_uid in error
        assert outcome.deliver == [] and outcome.delivered == []
        assert odd_node.services.repo.results_of_series(entry.series_instance_uid) == []
        return
    assert infer.status == JobStatus.SUCCEEDED, infer.last_error
    assert infer.attempts == 1
    assert [job.status for job in outcome.deliver] == [JobStatus.SUCCEEDED], [
        j.last_error for j in outcome.deliver
    ]
    assert infer.result is not None
    assert len(outcome.delivered) == len(infer.result["sop_instance_uids"]) >= 1
    for ds in outcome.delivered:
        assert str(ds.StudyInstanceUID) == row.study_instance_uid
        for keyword, value in entry.names.items():
            # Copied from the source, decoded and re-encoded unchanged (no '?' for characters lost).
            assert str(ds[keyword].value) == value, (keyword, str(ds[keyword].value), ds.SpecificCharacterSet)
    _check_content(entry, outcome, infer.result)


def _check_content(entry: OddSeries, outcome: Outcome, result: dict[str, Any]) -> None:
    """What the result must say for the entries where a wrong load would still give *a* result."""
    segs = [ds for ds in outcome.delivered if str(ds.SOPClassUID) == SEG_STORAGE]
    if entry.name == "monochrome1-cr":
        # The classifier saw the inverted image: its probability is that of max - stored value.
        stored = pydicom.dcmread(entry.files[0]).pixel_array.astype(np.float64)
        shown = stored.max() - stored
        expected = float((shown > (shown.min() + shown.max()) / 2).mean())
        assert result["findings"]["Bright area"] == pytest.approx(expected, abs=1e-3)
        assert expected != pytest.approx(float((stored > (stored.min() + stored.max()) / 2).mean()), abs=0.05)
        return
    [seg] = segs
    references = seg.ReferencedSeriesSequence[0]
    assert str(references.SeriesInstanceUID) == entry.series_instance_uid
    referenced = {str(item.ReferencedSOPInstanceUID) for item in references.ReferencedInstanceSequence}
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in entry.files}
    if entry.name == "duplicate-position-same-image":
        assert len(referenced) == len(entry.files) - 1 and referenced < sources  # one copy kept
    else:
        assert referenced == sources
    if entry.name == "gantry-tilt":
        # Frames on the tilted source planes as acquired, volume from the true (sheared) voxel.
        positions = {
            tuple(round(float(v), 3) for v in ds.ImagePositionPatient)
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in entry.files)
        }
        for frame in seg.PerFrameFunctionalGroupsSequence:
            plane = frame.PlanePositionSequence[0].ImagePositionPatient
            assert tuple(round(float(v), 3) for v in plane) in positions
        voxels = int(np.count_nonzero(seg.pixel_array))
        voxel_mm3 = 0.8 * 0.8 * STEP_MM * math.cos(math.radians(GANTRY_TILT_DEG))
        [volume_cm3] = result["volumes_cm3"].values()
        assert volume_cm3 == pytest.approx(voxels * voxel_mm3 / 1000, abs=0.01)


def test_the_node_keeps_serving_and_leaves_nothing_behind(
    outcomes: dict[str, Outcome], odd_node: OddNode, tmp_path: Path
) -> None:
    services = odd_node.services
    ae = AE(ae_title="ODDSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", odd_node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0x0000
    assoc.release()

    good = write_ct_series(tmp_path / "good", n_slices=4, rows=32, cols=32)
    with odd_node.routing_held():
        assert _send(odd_node.scp.port, good) == [0] * 4
    good_uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).SeriesInstanceUID)
    [(infer, deliver)] = _wait_settled(odd_node, [good_uid]).values()
    assert [j.status for j in infer + deliver] == [JobStatus.SUCCEEDED] * 2

    # The remedy for a refused gap: the missing instance arrives, the series re-opens and runs whole.
    gap = outcomes["missing-slice"].entry
    assert gap.held_back is not None
    with odd_node.routing_held():
        assert _send(odd_node.scp.port, [gap.held_back]) == [0]
    _wait_for_generation(odd_node, gap.series_instance_uid, 2)
    [(infer, deliver)] = _wait_settled(odd_node, [gap.series_instance_uid]).values()
    assert [(j.payload["generation"], j.status) for j in sorted(infer, key=lambda j: j.id)] == [
        (1, JobStatus.DEAD),
        (2, JobStatus.SUCCEEDED),
    ]
    assert [j.status for j in deliver] == [JobStatus.SUCCEEDED]

    # Nothing left behind: every spool file has its row and every row its file; no temp files.
    assert list(services.spool.incoming.iterdir()) == []
    series = [o.entry.series_instance_uid for o in outcomes.values()] + [good_uid]
    rows = {i.spool_path for uid in series for i in services.repo.instances_of_series(uid)}
    results = {r.spool_path for uid in series for r in services.repo.results_of_series(uid)}
    on_disk = {str(p.relative_to(services.spool.root)) for p in services.spool.root.rglob("*.dcm")}
    assert on_disk == rows | results
    assert services.repo.count_series() == sum(o.entry.outcome != "refused" for o in outcomes.values()) + 1
    assert list(odd_node.transfer_dir.iterdir()) == []
    # No crash anywhere: a traceback would mean an unexpected exception (retried as transient).
    crashes = [r.getMessage() for r in odd_node.log.records if r.exc_info]
    assert crashes == []
