"""The C-STORE SCP against real peers over loopback: DCMTK storescu and pynetdicom."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.synthetic import write_ct_series
from tests.conftest import RunningScp


def _storescu(files: list[Path], port: int, calling: str = "STORESCU") -> None:
    storescu(files, "AINODE", port, calling)


def _assoc(port: int, calling: str = "TESTSCU") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="AINODE")


def test_storescu_series_is_persisted_with_files_and_rows(running_scp: RunningScp, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=8)
    _storescu(files, running_scp.port)
    services = running_scp.services
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    row = services.repo.get_series(series_uid)
    assert row is not None and row.instance_count == 8 and row.modality == "CT"
    assert row.calling_ae == "STORESCU"
    stored = services.repo.instances_of_series(series_uid)
    sources = {str(dcmread(f).SOPInstanceUID): f for f in files}
    for inst in stored:
        path = services.spool.path(inst.spool_path)
        # File names come from UUIDs, never from DICOM values.
        assert inst.sop_instance_uid not in path.name
        # Stored as received: the pixel data is byte-identical.
        assert dcmread(path).PixelData == dcmread(sources[inst.sop_instance_uid]).PixelData
    assert list(services.spool.incoming.iterdir()) == []


def test_duplicate_instance_is_stored_once(running_scp: RunningScp, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=3)
    _storescu(files, running_scp.port)
    _storescu(files[:1], running_scp.port)  # answered Success again
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    row = running_scp.services.repo.get_series(series_uid)
    assert row is not None and row.instance_count == 3
    spooled = list((running_scp.services.spool.root / "instances").rglob("*.dcm"))
    assert len(spooled) == 3


def test_unknown_calling_ae_is_rejected(running_scp: RunningScp) -> None:
    assoc = _assoc(running_scp.port, calling="INTRUDER")
    assert assoc.is_rejected


def test_echo(running_scp: RunningScp) -> None:
    assoc = _assoc(running_scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def _garbage_file(path: Path, sop_instance_uid: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(fh), meta)
        # An element header declaring a 4 GB value that is not there, then junk.
        fh.write(b"\x08\x00\x18\x00UI\xff\xff" + b"\x01\x02\x03" * 50)
    return path


def test_corrupt_dataset_gets_failure_status_and_node_keeps_serving(
    running_scp: RunningScp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_uid = generate_uid()
    bad = _garbage_file(tmp_path / "bad.dcm", bad_uid)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the raw bytes as they are
    try:
        assoc = _assoc(running_scp.port)
        status = assoc.send_c_store(bad)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == 0xC212, hex(status.Status)  # the SOP Instance UID's length runs past the end
    assert bad_uid in caplog.text and "TESTSCU" in caplog.text
    # Nothing half-stored, and the node still serves.
    assert running_scp.services.repo.instances_of_series("1.2.3") == []
    files = write_ct_series(tmp_path / "ct", n_slices=2)
    _storescu(files, running_scp.port)


def test_missing_series_uid_is_refused_with_a900(running_scp: RunningScp, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    ds = dcmread(files[0])
    del ds.SeriesInstanceUID
    assoc = _assoc(running_scp.port)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA900


def test_disk_under_reserve_refuses_with_a700(node_settings: NodeSettings, tmp_path: Path) -> None:
    from dicom_ai_node.node import build_services
    from dicom_ai_node.receive.scp import StorageSCP

    settings = node_settings.model_copy(update={"disk_reserve_mb": 10**9})  # a petabyte reserve
    services = build_services(settings, migrate="upgrade")
    scp = StorageSCP(settings, services.spool, services.repo)
    scp.start()
    try:
        ds = dcmread(write_ct_series(tmp_path / "ct", n_slices=1)[0])
        assoc = _assoc(scp.port)
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xA700
        assert services.repo.get_series(str(ds.SeriesInstanceUID)) is None
    finally:
        scp.stop()


@pytest.mark.parametrize("calling,expected", [("TESTSCU", True), ("STORESCU", True), ("OTHER", False)])
def test_allow_list(calling: str, expected: bool) -> None:
    from dicom_ai_node.config import AllowedPeer
    from dicom_ai_node.receive.allowlist import PeerAllowList

    allow = PeerAllowList(
        [AllowedPeer(ae_title="TESTSCU", hosts=["127.0.0.0/8"]), AllowedPeer(ae_title="STORESCU")]
    )
    assert allow.is_allowed(calling, "127.0.0.1") is expected
    assert allow.is_allowed("TESTSCU", "10.1.2.3") is False
    assert PeerAllowList([], allow_any=True).is_allowed("ANY", "10.1.2.3")


TRANSFER_SYNTAX_FILES = [
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "ExplVR_BigEnd.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_jpeg_no_color_transform.dcm",  # JPEG Baseline
    "JPEG-lossy.dcm",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 Lossless
    "693_J2KI.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE Lossless
]


def test_every_transfer_syntax_is_stored_byte_for_byte_as_received(running_scp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Like Orthanc and most modalities, the sender proposes [the file's own syntax, Explicit VR LE] in one
    context; the node must choose the file's own syntax, so nothing is decompressed on the way.
    (pydicom's bundled test files; names that would trigger a download are not used.)"""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian as EVRLE

    test_files = Path(pydicom.__file__).parent / "data" / "test_files"
    repo, spool = running_scp.services.repo, running_scp.services.spool
    for name in TRANSFER_SYNTAX_FILES:
        source = test_files / name
        ds = dcmread(source)
        # Several of these files share a SOP Instance UID (they are one image in several encodings);
        # give each a fresh one so the node does not keep them as duplicates.
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        own = str(ds.file_meta.TransferSyntaxUID)
        compressed = ds.file_meta.TransferSyntaxUID.is_compressed
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ds.SOPClassUID, [own, EVRLE] if compressed else [own])
        assoc = ae.associate("127.0.0.1", running_scp.port, ae_title="AINODE")
        assert assoc.is_established
        assert assoc.accepted_contexts[0].transfer_syntax[0] == own, name
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000, name
        stored = {i.sop_instance_uid: i for i in repo.instances_of_series(str(ds.SeriesInstanceUID))}
        inst = stored[str(ds.SOPInstanceUID)]
        assert inst.transfer_syntax_uid == own, name
        # Never transcoded: the (possibly compressed) pixel data is exactly what the file holds.
        assert dcmread(spool.path(inst.spool_path)).PixelData == ds.PixelData, name
