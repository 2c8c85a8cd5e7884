"""Real image data written as DICOM series with pydicom (demo and test data; no real patient identity).

Sources (never downloaded at test time):
  * ch2: Debian ``mricron-data`` ``/usr/share/mricron/templates/ch2.nii.gz``, a 1 mm T1 brain MR (the
    Colin27 average), with ``ch2bet.nii.gz`` (the same head brain-extracted) as the reference brain mask.
  * lung1 / lung2: real chest CTs (512 x 512 x 48 / 61, 5 mm slices) with tumour labels from the
    pyradiomics 3.0.1 source distribution, in the test-data cache (``$AINODE_TEST_DATA`` or
    ``~/.cache/dicom-ai-node/test-data``) that ``scripts/fetch-test-data.sh`` fills.

Every call makes fresh UIDs (Orthanc does not fire OnStableSeries again for instances it already has),
unless a study UID is passed in. The patient and study modules hold obviously fake values. Files are
named by frame index, never by DICOM values.

Grid convention shared by everything here (PS3.3 C.7.6.2.1.1, patient coordinates are LPS: +x towards
the patient's left, +y posterior, +z head):
  * arrays on the DICOM grid are indexed ``[frame, row, column]``;
  * frames (and ``SeriesInfo.paths``) are in the order of increasing position along the slice normal
    ``n = row_direction x column_direction`` (for these axial series: feet to head);
  * ``voxel_to_patient`` maps ``(column, row, frame, 1)`` to LPS millimetres, i.e. its first column is
    the row direction (IOP[0:3]) times the column spacing, its second the column direction (IOP[3:6])
    times the row spacing, its third the normal times the slice spacing, its fourth IPP of frame 0.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel import orientations
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_ai_node.training.data import DataMissingError, nrrd_path, real_data_available

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
CH2_PATH = MRICRON_TEMPLATES / "ch2.nii.gz"
CH2BET_PATH = MRICRON_TEMPLATES / "ch2bet.nii.gz"


FAKE_PATIENT_NAME = "Test^Phantom"
FAKE_PATIENT_ID = "TEST-PHANTOM-0001"

# NIfTI world space is RAS+; DICOM patient space is LPS+: negate x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# nibabel axis codes name the direction each axis increases towards: columns towards the patient's
# left (+x LPS), rows towards posterior (+y LPS), frames towards the head (+z).
_DICOM_AXIAL_AXCODES = ("L", "P", "S")

FloatArray = np.ndarray


class DataSetMissingError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class SeriesInfo:
    """What was written, with enough geometry to check a result mask against a reference."""

    paths: tuple[Path, ...]  # one file per frame, increasing position along the slice normal
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    modality: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # DICOM order: (row spacing, column spacing) in mm
    slice_spacing: float
    image_orientation_patient: tuple[float, float, float, float, float, float]
    image_positions_patient: tuple[tuple[float, float, float], ...]
    voxel_to_patient: FloatArray  # 4x4, (column, row, frame, 1) -> LPS mm
    # Stored pixel values as written, (frames, rows, cols); CT: HU = stored - 1024.
    pixel_array: np.ndarray = field(repr=False)
    # Reference mask on the DICOM grid, bool (frames, rows, cols): ch2bet > 0, or the tumour label.
    reference_mask: np.ndarray | None = field(default=None, repr=False)
    # Maps any (frames, rows, cols) array on the DICOM grid back onto the source file's voxel grid.
    to_source_grid: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    source_path: Path | None = None


def lung_nrrd_path(name: str) -> Path:
    """Path of ``lung1_image.nrrd`` etc. in the test-data cache (the package's own lookup, which
    extracts it from the cached pyradiomics sdist if needed)."""
    try:
        return nrrd_path(name)
    except DataMissingError as exc:
        raise DataSetMissingError(str(exc)) from exc


def lung_data_available() -> bool:
    return real_data_available()


def ch2_mr_series(dest_dir: Path | str, *, study_instance_uid: str | None = None) -> SeriesInfo:
    """Write the ch2 T1 brain MR as an axial MR Image Storage series (181 frames of 217 x 181, 1 mm).

    The NIfTI (RAS+, affine diag(1, 1, 1), voxel i towards the right) is reoriented with nibabel so
    that columns run towards the patient's left, rows towards posterior and frames towards the head;
    the DICOM geometry comes from the reoriented affine converted RAS -> LPS, so
    IOP = [1, 0, 0, 0, 1, 0] and IPP(frame f) = (-90, -91, f - 71) mm for ch2. Pixel values are the
    NIfTI's 0-254 intensities unchanged, stored as 16-bit unsigned. ``reference_mask`` is
    ``ch2bet > 0`` on the DICOM grid; ``to_source_grid`` undoes the reorientation exactly.
    """
    for path in (CH2_PATH, CH2BET_PATH):
        if not path.is_file():
            raise DataSetMissingError(f"{path} not found: apt-get install mricron-data")
    # Both are NIfTI-1 files (nib.load's declared return type is the base class).
    image = cast(nib.Nifti1Image, nib.load(CH2_PATH))
    brain = cast(nib.Nifti1Image, nib.load(CH2BET_PATH))
    if image.shape != brain.shape or not np.allclose(image.affine, brain.affine):
        raise ValueError("ch2 and ch2bet are not on the same grid")

    source_ornt = orientations.io_orientation(image.affine)
    to_dicom = orientations.ornt_transform(source_ornt, orientations.axcodes2ornt(_DICOM_AXIAL_AXCODES))
    from_dicom = orientations.ornt_transform(orientations.axcodes2ornt(_DICOM_AXIAL_AXCODES), source_ornt)
    # Affine of the reoriented (column, row, frame) grid, then RAS -> LPS.
    affine_ras = image.affine @ orientations.inv_ornt_aff(to_dicom, image.shape)
    voxel_to_patient = RAS_TO_LPS @ affine_ras

    def to_dicom_grid(volume: np.ndarray) -> np.ndarray:  # source (i, j, k) -> (frame, row, column)
        return np.ascontiguousarray(orientations.apply_orientation(volume, to_dicom).transpose(2, 1, 0))

    def to_source_grid(volume: np.ndarray) -> np.ndarray:
        return np.asarray(orientations.apply_orientation(np.asarray(volume).transpose(2, 1, 0), from_dicom))

    intensities = np.asanyarray(image.dataobj)
    if intensities.min() < 0 or intensities.max() > np.iinfo(np.uint16).max:
        raise ValueError("ch2 intensities do not fit 16-bit unsigned")
    pixels = to_dicom_grid(intensities).astype(np.uint16)
    mask = to_dicom_grid(np.asanyarray(brain.dataobj) > 0)

    return _write_series(
        Path(dest_dir),
        pixels,
        voxel_to_patient,
        _mr_image_module,
        modality="MR",
        sop_class_uid=MRImageStorage,
        series_description="T1 3D",
        body_part="BRAIN",
        study_instance_uid=study_instance_uid,
        reference_mask=mask,
        to_source_grid=to_source_grid,
        source_path=CH2_PATH,
    )


def lung_ct_series(
    dest_dir: Path | str,
    which: str = "lung1",
    *,
    frames: slice | None = None,
    study_instance_uid: str | None = None,
) -> SeriesInfo:
    """Write a pyradiomics chest CT (``lung1``: 48 frames, ``lung2``: 61) as a CT Image Storage series.

    The NRRD is in LPS space with axis-aligned directions: its axis 0 runs along the columns (DICOM
    row direction), axis 1 along the rows, axis 2 between frames. Values are HU (-1024..3071), stored
    unsigned with RescaleIntercept -1024 and RescaleSlope 1. ``frames`` picks a subset of the frames
    (after ordering feet to head), e.g. ``slice(20, 25)`` for a quick 5-instance series.
    ``reference_mask`` is the tumour label (``*_label.nrrd`` > 0) on the same frames.
    """
    if which not in ("lung1", "lung2"):
        raise ValueError(f"which must be 'lung1' or 'lung2', not {which!r}")
    import nrrd  # pynrrd: a dev dependency, like this module

    image_path = lung_nrrd_path(f"{which}_image.nrrd")
    hu, header = nrrd.read(str(image_path))
    label, _ = nrrd.read(str(lung_nrrd_path(f"{which}_label.nrrd")))
    voxel_to_patient = nrrd_voxel_to_patient(header)

    pixels = np.ascontiguousarray(hu.transpose(2, 1, 0))  # (i, j, k) -> (frame, row, column)
    mask = np.ascontiguousarray(label.transpose(2, 1, 0) > 0)
    if frames is not None:
        start = range(pixels.shape[0])[frames][0]
        voxel_to_patient = voxel_to_patient.copy()
        voxel_to_patient[:3, 3] += voxel_to_patient[:3, 2] * start
        if frames.step not in (None, 1):
            raise ValueError("frames must be contiguous")
        pixels, mask = pixels[frames], mask[frames]

    stored = pixels.astype(np.int32) + 1024
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("HU values outside -1024..3071 do not fit 12 stored bits")
    return _write_series(
        Path(dest_dir),
        stored.astype(np.uint16),
        voxel_to_patient,
        _ct_image_module,
        modality="CT",
        sop_class_uid=CTImageStorage,
        series_description="CHEST CT",
        body_part="CHEST",
        study_instance_uid=study_instance_uid,
        reference_mask=mask,
        source_path=image_path,
    )


def nrrd_voxel_to_patient(header: dict[str, object]) -> FloatArray:
    """(column, row, frame) -> LPS mm from NRRD space directions/origin; refuses what we cannot map."""
    space = str(header.get("space", ""))
    if space not in ("left-posterior-superior", "right-anterior-superior"):
        raise ValueError(f"unsupported NRRD space {space!r}")
    units = header.get("space units")
    if units is not None and any(str(u) != "mm" for u in units):  # type: ignore[attr-defined]
        raise ValueError(f"unsupported NRRD space units {units!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # one vector per axis
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    if space == "right-anterior-superior":
        affine = RAS_TO_LPS @ affine
    row_dir, col_dir, step = (affine[:3, n] for n in range(3))
    if abs(np.dot(row_dir, col_dir)) > 1e-6 or np.dot(np.cross(row_dir, col_dir), step) <= 0:
        raise ValueError("NRRD grid is not orthogonal with frames along +normal")
    return affine


def _write_series(
    dest_dir: Path,
    pixels: np.ndarray,
    voxel_to_patient: FloatArray,
    add_image_module: Callable[[Dataset], None],
    *,
    modality: str,
    sop_class_uid: str,
    series_description: str,
    body_part: str,
    study_instance_uid: str | None,
    reference_mask: np.ndarray | None,
    source_path: Path,
    to_source_grid: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SeriesInfo:
    n_frames, rows, columns = pixels.shape
    column_spacing, row_spacing, slice_spacing = (
        float(np.linalg.norm(voxel_to_patient[:3, n])) for n in range(3)
    )
    row_dir = voxel_to_patient[:3, 0] / column_spacing
    col_dir = voxel_to_patient[:3, 1] / row_spacing
    if np.dot(np.cross(row_dir, col_dir), voxel_to_patient[:3, 2]) <= 0:
        raise ValueError("frames must be ordered along the slice normal")
    iop = tuple(round(float(v), 6) for v in (*row_dir, *col_dir))
    positions = [
        tuple(round(float(v), 4) for v in voxel_to_patient @ (0, 0, f, 1))[:3] for f in range(n_frames)
    ]
    normal = np.cross(row_dir, col_dir)

    study_uid = study_instance_uid or generate_uid()
    series_uid, frame_of_reference_uid = generate_uid(), generate_uid()
    now = datetime.datetime.now()
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sop_uids: list[str] = []
    for f in range(n_frames):
        ds = _base_dataset(sop_class_uid, now)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid, ""
        ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = modality, series_description, body_part
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, f + 1, 1
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(positions[f])
        ds.SliceLocation = round(float(np.dot(normal, positions[f])), 4)
        ds.PixelSpacing = [round(row_spacing, 6), round(column_spacing, 6)]
        ds.SliceThickness = round(slice_spacing, 6)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.PixelRepresentation = 16, 0
        add_image_module(ds)
        ds.PixelData = np.ascontiguousarray(pixels[f], dtype="<u2").tobytes()
        path = dest_dir / f"{f:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sop_uids.append(ds.SOPInstanceUID)
    return SeriesInfo(
        paths=tuple(paths),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        sop_instance_uids=tuple(sop_uids),
        modality=modality,
        rows=rows,
        columns=columns,
        pixel_spacing=(row_spacing, column_spacing),
        slice_spacing=slice_spacing,
        image_orientation_patient=iop,  # type: ignore[arg-type]
        image_positions_patient=tuple(positions),  # type: ignore[arg-type]
        voxel_to_patient=voxel_to_patient,
        pixel_array=pixels,
        reference_mask=reference_mask,
        to_source_grid=to_source_grid,
        source_path=source_path,
    )


def _base_dataset(sop_class_uid: str, now: datetime.datetime) -> Dataset:
    """SOP common, patient, general study and equipment modules with obviously fake identity."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, generate_uid()
    ds.PatientName, ds.PatientID = FAKE_PATIENT_NAME, FAKE_PATIENT_ID
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "TEST0001", "1", ""
    ds.StudyDescription = "TEST PHANTOM STUDY"
    ds.Manufacturer = "dicom-ai-node test data"
    return ds


def _ct_image_module(ds: Dataset) -> None:
    """CT Image module (PS3.3 C.8.2.1): HU = stored - 1024, 12 bits stored."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP = 120
    ds.WindowCenter, ds.WindowWidth = -600, 1500  # lung window


def _mr_image_module(ds: Dataset) -> None:
    """MR Image module (PS3.3 C.8.3.1); ch2 is an average of 27 T1 gradient-echo scans."""
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.BitsStored, ds.HighBit = 16, 15
    ds.ScanningSequence, ds.SequenceVariant = "GR", "SP"
    ds.ScanOptions, ds.MRAcquisitionType = "", "3D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 18, 10, 1
    ds.MagneticFieldStrength = 1.5
    ds.WindowCenter, ds.WindowWidth = 100, 200
