"""The test harness itself against real peers: Debian's Orthanc with orthanc-dev's config and Lua
auto-forward, DCMTK storescu, and a pynetdicom storage SCP standing in for the node; plus the geometry of
the real-data series of dicom_ai_node/devtools/datasets.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_ai_node.devtools.datasets import (
    CH2_PATH,
    CH2BET_PATH,
    RAS_TO_LPS,
    SeriesInfo,
    ch2_mr_series,
    lung_ct_series,
    lung_data_available,
)
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.ports import free_port
from tests.support.tools import require, require_executable

NODE_AET = "AINODE"


@pytest.fixture
def needs_orthanc() -> None:
    require(
        Path("/usr/sbin/Orthanc").is_file() and shutil.which("storescu") is not None,
        "Debian's orthanc and dcmtk",
        "apt-get install orthanc orthanc-dicomweb dcmtk",
    )


@pytest.fixture
def needs_lungs() -> None:
    require(lung_data_available(), "the pyradiomics chest CTs", "bash scripts/fetch-test-data.sh")


@dataclass
class StorageScp:
    """A pynetdicom storage SCP standing in for the node: accepts everything, remembers what came."""

    port: int
    received: list[tuple[str, str]] = field(default_factory=list)  # (calling AE, SeriesInstanceUID)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def series_count(self, series_instance_uid: str) -> int:
        with self.lock:
            return sum(1 for _, uid in self.received if uid == series_instance_uid)


@pytest.fixture(scope="module")
def scp() -> Iterator[StorageScp]:
    ae = AE(ae_title=NODE_AET)
    ae.supported_contexts = AllStoragePresentationContexts
    state = StorageScp(port=free_port())

    def on_open(event: evt.Event) -> None:
        # pynetdicom never sets TCP_NODELAY: without it each response stalls ~45 ms (notes).
        assoc_socket = event.assoc.dul.socket
        if assoc_socket is not None and assoc_socket.socket is not None:
            assoc_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        with state.lock:
            state.received.append((event.assoc.requestor.ae_title, str(ds.SeriesInstanceUID)))
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", state.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)],
    )
    assert server is not None
    try:
        yield state
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def orthanc(scp: StorageScp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        server.start(node_aet=NODE_AET, node_port=scp.port, stable_age=2)
        yield server


def _fresh_sr(dest: Path) -> Path:
    """pydicom's Comprehensive SR test file with fresh UIDs (Orthanc ignores instances it already has)."""
    ds = pydicom.dcmread(str(get_testdata_file("test-SR.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest)
    return dest


def _seg_of(series: SeriesInfo, dest: Path) -> Path:
    """A real binary SEG (highdicom) on the first frames of `series`, like the node's results."""
    sources = [pydicom.dcmread(p) for p in series.paths]
    mask = np.zeros((len(sources), series.rows, series.columns), dtype=bool)
    mask[:, 200:300, 200:300] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="box",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("39607008", "SCT", "Lung"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="dicom-ai-node tests",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(dest)
    return dest


def _orthanc_series_id(orthanc: OrthancServer, series_instance_uid: str, what: str) -> str:
    return str(
        orthanc.wait_for(
            lambda: orthanc.find_series(series_instance_uid), 10, what=f"{what} series in Orthanc"
        )
    )


@pytest.mark.usefixtures("needs_orthanc", "needs_lungs")
def test_orthanc_stores_and_auto_forwards_a_stable_series(
    orthanc: OrthancServer, scp: StorageScp, tmp_path: Path
) -> None:
    ct = lung_ct_series(tmp_path / "ct", "lung1", frames=slice(20, 25))
    storescu(list(ct.paths), orthanc.aet, orthanc.dicom_port)

    study_id = orthanc.wait_for(
        lambda: orthanc.find_study(ct.study_instance_uid), 10, what="study in Orthanc"
    )
    assert study_id in orthanc.studies()
    [series] = orthanc.series_of_study(study_id)
    assert series["MainDicomTags"]["SeriesInstanceUID"] == ct.series_instance_uid
    assert len(series["Instances"]) == 5
    assert orthanc.instance_metadata(series["Instances"][0])["RemoteAET"] == "STORESCU"
    # Read back through HTTP: the stored object is the one we sent.
    back = pydicom.dcmread(orthanc.download_instance(series["Instances"][0], tmp_path / "back.dcm"))
    assert back.SOPInstanceUID in ct.sop_instance_uids

    orthanc.wait_for(
        lambda: scp.series_count(ct.series_instance_uid) == 5, 15, what="5 instances forwarded to the SCP"
    )
    assert {aet for aet, uid in scp.received if uid == ct.series_instance_uid} == {orthanc.aet}


@pytest.mark.usefixtures("needs_orthanc", "needs_lungs")
def test_results_and_series_from_the_node_are_not_forwarded(
    orthanc: OrthancServer, scp: StorageScp, tmp_path: Path
) -> None:
    from_node = lung_ct_series(tmp_path / "from-node", "lung1", frames=slice(30, 32))
    seg = _seg_of(from_node, tmp_path / "seg.dcm")
    sr = _fresh_sr(tmp_path / "sr.dcm")
    control = lung_ct_series(tmp_path / "control", "lung2", frames=slice(30, 32))

    # -R: propose only the files' SOP classes (storescu's built-in list lacks SEG).
    storescu([*from_node.paths, seg], orthanc.aet, orthanc.dicom_port, NODE_AET, "-R")
    storescu([sr, *control.paths], orthanc.aet, orthanc.dicom_port, "STORESCU")
    skipped_uids = {
        "from the node": from_node.series_instance_uid,
        "SEG": pydicom.dcmread(seg).SeriesInstanceUID,
        "SR": pydicom.dcmread(sr).SeriesInstanceUID,
    }
    skipped_ids = {why: _orthanc_series_id(orthanc, uid, why) for why, uid in skipped_uids.items()}
    node_instance = orthanc.get_json(f"/series/{skipped_ids['from the node']}")["Instances"][0]
    assert orthanc.instance_metadata(node_instance)["RemoteAET"] == NODE_AET

    # The Lua script logs each decision; wait for all of them, then nothing skipped may have arrived.
    def decided() -> bool:
        log = "\n".join(orthanc.lua_log_lines())
        return all(f"skip series {series_id} " in log for series_id in skipped_ids.values())

    orthanc.wait_for(decided, 15, what="the Lua skip decisions")
    orthanc.wait_for(
        lambda: scp.series_count(control.series_instance_uid) == 2, 15, what="the control series forwarded"
    )
    log = "\n".join(orthanc.lua_log_lines())
    assert f"skip series {skipped_ids['SEG']} (modality SEG)" in log
    assert f"skip series {skipped_ids['SR']} (modality SR)" in log
    assert f"skip series {skipped_ids['from the node']} (sent by the node itself)" in log
    for why, uid in skipped_uids.items():
        assert scp.series_count(uid) == 0, f"{why} series was forwarded"


def test_ch2_series_geometry_matches_the_nifti(tmp_path: Path) -> None:
    info = ch2_mr_series(tmp_path / "ch2")
    bet = np.asanyarray(nib.nifti1.load(CH2BET_PATH).dataobj) > 0
    nifti = nib.nifti1.load(CH2_PATH)

    assert info.reference_mask is not None and info.to_source_grid is not None
    assert info.reference_mask.shape == (len(info.paths), info.rows, info.columns) == (181, 217, 181)
    assert int(info.reference_mask.sum()) == int(bet.sum())
    assert np.array_equal(info.to_source_grid(info.reference_mask), bet)

    headers = [pydicom.dcmread(p) for p in info.paths]
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    positions = ipp @ normal
    assert np.allclose(np.diff(positions), 1.0)  # increasing along the normal, 1 mm apart
    assert np.allclose(np.diff(ipp[:, :2], axis=0), 0)
    assert [float(v) for v in headers[0].PixelSpacing] == [1.0, 1.0]

    # Same voxel, two routes: DICOM header geometry vs the NIfTI affine (RAS) turned into LPS.
    pixels = np.stack([ds.pixel_array for ds in headers])
    assert np.array_equal(info.to_source_grid(pixels), np.asanyarray(nifti.dataobj))
    for frame, row, col in [(0, 0, 0), (90, 100, 30), (180, 216, 180), (40, 5, 170)]:
        dicom_lps = ipp[frame] + iop[:3] * col * 1.0 + iop[3:] * row * 1.0
        index = np.zeros((181, 217, 181), dtype=bool)
        index[frame, row, col] = True
        ijk = np.argwhere(info.to_source_grid(index))[0]
        nifti_lps = (RAS_TO_LPS @ nifti.affine @ np.array([*ijk, 1.0]))[:3]
        assert np.allclose(dicom_lps, nifti_lps), (frame, row, col)


def test_written_series_pass_dciodvfy(tmp_path: Path) -> None:
    require_executable("dciodvfy", "apt-get install dicom3tools")
    files = [ch2_mr_series(tmp_path / "mr").paths[90]]
    if lung_data_available():
        files.append(lung_ct_series(tmp_path / "ct", "lung2", frames=slice(0, 1)).paths[0])
    for path in files:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        problems = [line for line in result.stderr.splitlines() if line.startswith(("Error", "Warning"))]
        assert problems == [], f"{path.parent.name}: {problems}"
