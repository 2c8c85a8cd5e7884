"""Series completion signals against the real node (`serve --no-workers`: infer jobs stay queued, so the
job's creation time is exactly when the series was routed), with DCMTK storescu and a pynetdicom SCU:

- FORWARDER has `series_complete_on_release`: its A-RELEASE completes the series at once, although the
  quiet period is 10 s; an image after that re-opens the series and its release routes a revision;
- an aborted association of the same peer signals nothing, and a peer without the option (STORESCU)
  waits for the quiet period: the fallback;
- an expected count (ImagesInAcquisition) reached completes the series without waiting.

Times are the node's own (job created_at - series last_received_at, from its database through the API).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import wait_for
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.persistence.db import make_engine
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.store.spool import Spool

QUIET_S = 10.0
# Routed by a signal: well inside the quiet period even on a busy 2-core machine (the node needs about
# one sweep, 0.5 s here, or less: the release kicks the sweep at once).
SIGNAL_WITHIN_S = 4.0
FORWARDER = "FORWARDER"

RULES = {
    "rules": [
        {
            "id": "any-ct",
            "version": 1,
            "description": "every CT series (completion signal tests)",
            "conditions": [{"attribute": "Modality", "equals": "CT"}],
            "action": {"model": "ct-lung", "destinations": ["pacs"]},
        }
    ]
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("signals")
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES, sort_keys=False))
    process = NodeProcess(
        work / "node",
        pacs_aet=FORWARDER,
        pacs_port=free_port(),  # nothing is delivered: no workers
        quiet_period_s=QUIET_S,
        pacs_complete_on_release=True,
        serve_args=("--no-workers",),
        extra={"rules_file": str(rules)},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _series(directory: Path, n: int, **attrs: Any) -> tuple[str, list[Path]]:
    files = write_ct_series(directory, n_slices=n, rows=32, cols=32)
    if attrs:
        for path in files:
            ds = dcmread(path)
            for keyword, value in attrs.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), files


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _routed(node: NodeProcess, series_uid: str, generation: int = 1) -> tuple[dict[str, Any], float]:
    """Wait for the series' infer job of `generation`; (series, seconds from its last instance to the job)."""

    def job() -> tuple[dict[str, Any], dict[str, Any]] | None:
        series = node.get_json(f"/api/series/{series_uid}")
        found = [j for j in series["jobs"] if j["payload"].get("generation") == generation]
        return (series, found[0]) if found and series["status"] == "routed" else None

    series, infer = wait_for(job, QUIET_S * 4, interval_s=0.2, what=f"job of {series_uid} g{generation}")
    return series, (_ts(infer["created_at"]) - _ts(series["last_received_at"])).total_seconds()


def test_release_completes_at_once_and_a_late_image_makes_a_revision(
    node: NodeProcess, tmp_path: Path
) -> None:
    series_uid, files = _series(tmp_path / "ct", 24)
    storescu(files, node.ae_title, node.dicom_port, FORWARDER)
    series, waited = _routed(node, series_uid)
    assert waited < SIGNAL_WITHIN_S, f"routed {waited:.2f} s after the last instance"
    assert series["instance_count"] == 24 and series["generation"] == 1
    assert series["route_note"] == "routed by any-ct v1; complete: association released"

    # A late image (new SOP Instance UID) in a new association: a new generation, routed on its release.
    ds = dcmread(files[-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 25
    late = tmp_path / "late.dcm"
    ds.save_as(late)
    storescu([late], node.ae_title, node.dicom_port, FORWARDER)
    series, waited = _routed(node, series_uid, generation=2)
    assert waited < SIGNAL_WITHIN_S
    assert (series["instance_count"], series["generation"]) == (25, 2)
    jobs = sorted(series["jobs"], key=lambda j: j["id"])
    assert [j["payload"]["generation"] for j in jobs] == [1, 2]


def test_abort_and_a_peer_without_the_signal_wait_for_the_quiet_period(
    node: NodeProcess, tmp_path: Path
) -> None:
    aborted_uid, aborted_files = _series(tmp_path / "aborted", 3)
    ae = AE(ae_title=FORWARDER)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=node.ae_title)
    assert assoc.is_established
    for path in aborted_files:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.abort()

    plain_uid, plain_files = _series(tmp_path / "plain", 5)
    storescu(plain_files, node.ae_title, node.dicom_port, "STORESCU")  # released, but not a signal

    for series_uid in (aborted_uid, plain_uid):
        series, waited = _routed(node, series_uid)
        assert waited >= QUIET_S - 0.1, f"{series_uid} routed {waited:.2f} s after its last instance"
        assert series["route_note"] == f"routed by any-ct v1; complete: quiet {QUIET_S:g} s"


def test_expected_count_completes_without_waiting(node: NodeProcess, tmp_path: Path) -> None:
    series_uid, files = _series(tmp_path / "counted", 6, ImagesInAcquisition=6)
    # Two associations of a peer without the signal: the first 4 leave the series waiting, the last 2
    # reach the count.
    storescu(files[:4], node.ae_title, node.dicom_port, "STORESCU")
    storescu(files[4:], node.ae_title, node.dicom_port, "STORESCU")
    series, waited = _routed(node, series_uid)
    assert waited < SIGNAL_WITHIN_S
    assert series["route_note"] == "routed by any-ct v1; complete: 6 of 6 expected instances"


def test_the_signal_is_per_ae_title_and_off_where_its_entries_disagree(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    repo = SeriesRepository(engine)

    def signalling(peers: list[dict[str, Any]]) -> set[str] | None:
        settings = NodeSettings(dicom={"allowed_peers": peers}, spool_dir=tmp_path / "spool")
        release = StorageSCP(settings, Spool(tmp_path / "spool"), repo).release
        return None if release is None else set(release.ae_titles)

    on = {"series_complete_on_release": True}
    assert signalling([{"ae_title": "STORESCU"}]) is None
    assert signalling([{"ae_title": "ORTHANC", **on}, {"ae_title": "STORESCU"}]) == {"ORTHANC"}
    # Two entries for one AE title, only one with the option: the quiet period decides (the safe side).
    assert signalling(
        [
            {"ae_title": "ORTHANC", "hosts": ["10.0.0.1"], **on},
            {"ae_title": "ORTHANC", "hosts": ["10.0.0.2"]},
            {"ae_title": "ROUTER", **on},
        ]
    ) == {"ROUTER"}
    engine.dispose()
