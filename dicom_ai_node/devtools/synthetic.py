"""Small synthetic, but valid, CT and MR series written with pydicom (no real patient).

Every value in the patient/study modules is obviously fake. Each call makes fresh UIDs unless they are
passed in (Orthanc ignores instances it already has, so tests need fresh ones). Files are named by
slice index, never by DICOM values. The returned paths are in slice order (increasing position along
the slice normal), which is also the order of the returned volume's first axis.

The pixel content is a simple phantom: CT has an elliptic "body" (40 HU) with two elliptic "lungs"
(-850 HU) in air (-1000 HU); MR has a bright ellipsoid "brain" in a darker "head".
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

AXIAL: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

FAKE_PATIENT_NAME = "Synthetic^Phantom"
FAKE_PATIENT_ID = "SYNTH-0001"


def write_ct_series(
    directory: Path | str,
    n_slices: int = 12,
    rows: int = 64,
    cols: int = 64,
    *,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_thickness: float = 2.5,
    image_orientation_patient: Sequence[float] = AXIAL,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 2,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
) -> list[Path]:
    """Write a CT series (CT Image Storage, one file per slice); return the paths in slice order."""
    hu = ct_phantom_hu(n_slices, rows, cols)
    stored = np.rint((hu - rescale_intercept) / rescale_slope)
    if stored.min() < 0 or stored.max() > np.iinfo(np.uint16).max:
        raise ValueError("rescale parameters do not map the phantom into uint16")
    return _write_series(
        directory,
        stored.astype(np.uint16),
        modality="CT",
        sop_class_uid=CTImageStorage,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        image_orientation_patient=image_orientation_patient,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        add_modality_module=lambda ds: _add_ct_image(ds, rescale_slope, rescale_intercept),
    )


def write_mr_series(
    directory: Path | str,
    n_slices: int = 12,
    rows: int = 64,
    cols: int = 64,
    *,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    slice_thickness: float = 3.0,
    image_orientation_patient: Sequence[float] = AXIAL,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 3,
) -> list[Path]:
    """Write an MR series (MR Image Storage, one file per slice); return the paths in slice order."""
    return _write_series(
        directory,
        mr_phantom(n_slices, rows, cols),
        modality="MR",
        sop_class_uid=MRImageStorage,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        image_orientation_patient=image_orientation_patient,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        add_modality_module=_add_mr_image,
    )


def ct_phantom_hu(n_slices: int, rows: int, cols: int) -> np.ndarray:
    """HU volume (frames, rows, cols): air, an elliptic body and two elliptic lungs."""
    z, y, x = _unit_grid(n_slices, rows, cols)
    hu = np.full((n_slices, rows, cols), -1000.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0
    hu[np.broadcast_to(body, hu.shape)] = 40.0
    lung_extent = (z / 0.85) ** 2
    for centre_x in (-0.42, 0.42):
        lung = ((x - centre_x) / 0.3) ** 2 + (y / 0.45) ** 2 + lung_extent <= 1.0
        hu[lung] = -850.0
    return hu


def mr_phantom(n_slices: int, rows: int, cols: int) -> np.ndarray:
    """uint16 volume (frames, rows, cols): a dark head ellipsoid with a bright brain ellipsoid inside."""
    z, y, x = _unit_grid(n_slices, rows, cols)
    image = np.zeros((n_slices, rows, cols), dtype=np.uint16)
    image[(x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 1.1) ** 2 <= 1.0] = 300
    image[(x / 0.7) ** 2 + (y / 0.75) ** 2 + (z / 0.9) ** 2 <= 1.0] = 900
    return image


def _unit_grid(n_slices: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1] along each axis (voxel centres), broadcastable to (frames, rows, cols)."""

    def axis(n: int) -> np.ndarray:
        return (np.arange(n) + 0.5) / n * 2.0 - 1.0

    return (
        axis(n_slices)[:, None, None],
        axis(rows)[None, :, None],
        axis(cols)[None, None, :],
    )


def _base_dataset(
    sop_class_uid: str,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    now: datetime.datetime,
    *,
    modality: str,
    series_number: int,
    study_description: str,
    series_description: str,
    body_part: str,
) -> Dataset:
    """File Meta, SOP Common, Patient (fake values), General Study, General Series and Equipment: what
    every synthetic image shares, whatever its modality."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    # Patient (obviously fake values)
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = "19000101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTH1"
    ds.AccessionNumber = "SYNTHACC1"
    ds.StudyDescription = study_description
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    # General Equipment
    ds.Manufacturer = "Synthetic"
    return ds


def _write_series(
    directory: Path | str,
    pixels: np.ndarray,
    *,
    modality: str,
    sop_class_uid: str,
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    image_orientation_patient: Sequence[float],
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    frame_of_reference_uid: str | None,
    series_number: int,
    add_modality_module: Callable[[Dataset], None],
) -> list[Path]:
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    iop = np.asarray(image_orientation_patient, dtype=float)
    if iop.shape != (6,):
        raise ValueError("image_orientation_patient needs 6 values")
    normal = np.cross(iop[:3], iop[3:])
    n_slices, rows, cols = pixels.shape
    # Centre the volume on the origin so the coordinates look like a real scanner's.
    origin = -(iop[:3] * pixel_spacing[1] * (cols - 1) + iop[3:] * pixel_spacing[0] * (rows - 1)) / 2.0
    origin = origin - normal * slice_thickness * (n_slices - 1) / 2.0
    now = datetime.datetime(2001, 1, 1, 12, 0, 0)

    paths: list[Path] = []
    for index in range(n_slices):
        sop_instance_uid = generate_uid()
        ds = _base_dataset(
            sop_class_uid,
            sop_instance_uid,
            study_uid,
            series_uid,
            now,
            modality=modality,
            series_number=series_number,
            study_description="Synthetic phantom study",
            series_description=f"Synthetic {modality} phantom",
            body_part="CHEST" if modality == "CT" else "HEAD",
        )
        ds.PatientPosition = "HFS"
        # Frame of Reference
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # General Image
        ds.InstanceNumber = index + 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        # Image Plane
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        position = origin + normal * slice_thickness * index
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceThickness = float(slice_thickness)
        ds.SliceLocation = round(float(np.dot(position, normal)), 4)
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels[index], dtype="<u2").tobytes()
        add_modality_module(ds)

        path = out_dir / f"slice_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _add_ct_image(ds: Dataset, rescale_slope: float, rescale_intercept: float) -> None:
    """CT Image module (PS3.3 C.8.2.1)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = 120.0
    ds.RescaleIntercept = rescale_intercept
    ds.RescaleSlope = rescale_slope
    ds.RescaleType = "HU"
    ds.WindowCenter = -600.0
    ds.WindowWidth = 1500.0


def _add_mr_image(ds: Dataset) -> None:
    """MR Image module (PS3.3 C.8.3.1)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 500.0
    ds.EchoTime = 15.0
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"


def write_cr_image(
    directory: Path | str,
    brightness: float,
    *,
    rows: int = 256,
    cols: int = 256,
    study_instance_uid: str | None = None,
    body_part: str = "CHEST",
) -> Path:
    """Write one chest CR image (CR Image Storage, PA view, no Image Plane module, as real CRs).

    `brightness` (0..1) scales a smooth "thorax" pattern: classifiers in the tests score it, so a bright
    and a dark image give predictably different probabilities.
    """
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:rows, :cols]
    thorax = np.exp(-(((x - cols / 2) / (cols / 3)) ** 2 + ((y - rows / 2) / (rows / 2.5)) ** 2))
    pixels = np.rint(4095 * np.clip(brightness * (0.5 + 0.5 * thorax), 0, 1)).astype("<u2")
    now = datetime.datetime(2001, 1, 1, 12, 0, 0)
    ds = _base_dataset(
        CR_IMAGE_STORAGE,
        generate_uid(),
        study_instance_uid or generate_uid(),
        generate_uid(),
        now,
        modality="CR",
        series_number=1,
        study_description="Synthetic chest radiograph",
        series_description="Synthetic chest PA",
        body_part=body_part,
    )
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    path = out_dir / "cr_0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
