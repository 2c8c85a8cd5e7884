"""Volumes from what validation sets hold besides DICOM series: NIfTI, NRRD and single 2-D DICOM images.

Every loader returns the same `Volume` the node's own DICOM loader produces (float32 array (frames, rows,
cols), spacing (dz, dy, dx) mm, affine_lps mapping (col, row, frame, 1) -> LPS mm), so models and metrics
see one geometry convention whatever the file format:

- NIfTI world space is RAS: affine_lps = diag(-1, -1, 1, 1) @ affine_ras; the NIfTI (i, j, k) array is
  (col, row, frame), so the volume array is data.transpose(2, 1, 0).
- NRRD: "space directions" (one vector per axis) and "space origin" in the file's "space"; LPS is used
  as is, RAS and LAS are converted by negating the flipped patient axes.
- A grid whose frames run against row x column (left-handed, common in NIfTI) is flipped along the
  frame axis, so frames always advance along the slice normal as they do for DICOM series.
- A projection image (CR, DX, MG, secondary capture: no ImagePositionPatient) becomes one frame on an
  axis-aligned grid with its PixelSpacing / ImagerPixelSpacing (1 mm when absent).

The Volume's `datasets` are minimal stand-in headers (Modality, Rows, Columns, a series UID derived from
the case name) for NIfTI/NRRD: models read geometry from the affine, and name the series in errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pydicom
from nibabel.filebasedimages import ImageFileError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.pixels.processing import apply_modality_lut

from dicom_ai_node.encode.uids import deterministic_uid
from dicom_ai_node.errors import InvalidDicomError
from dicom_ai_node.infer.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# NRRD "space" values (full names and the abbreviations the NRRD spec allows) -> the sign to apply to
# each patient axis to get LPS.
_NRRD_SPACES: dict[str, tuple[float, float, float]] = {
    "left-posterior-superior": (1.0, 1.0, 1.0),
    "lps": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0),
    "ras": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (1.0, -1.0, 1.0),
    "las": (1.0, -1.0, 1.0),
}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def image_stem(path: Path) -> str:
    """The case name of an image file: its name without .nii.gz / .nii / .nrrd / .nhdr / .dcm."""
    name = path.name
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def read_image_grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (frames, rows, cols) in the file's dtype, affine_lps (col, row, frame, 1) -> LPS mm)."""
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        data, affine_lps = _read_nrrd(path)
    else:
        try:
            # nibabel's loader is typed as the abstract FileBasedImage; NIfTI images are spatial.
            image: Any = nib.load(str(path))
        except (OSError, ImageFileError) as exc:
            raise InvalidDicomError(f"{path.name}: not a readable NIfTI image: {exc}") from exc
        # get_fdata applies scl_slope/scl_inter (e.g. HU stored with a scale); labels stay integral.
        data = np.asanyarray(image.dataobj)
        if image.header.get_slope_inter() != (None, None):
            data = image.get_fdata(dtype=np.float32)
        affine_lps = _LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
    data = _as_3d(data, path)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    return _frames_along_normal(array, affine_lps)


def volume_from_image_file(path: Path, case: str, modality: str) -> Volume:
    """A NIfTI/NRRD image as a Volume (float32, modality units as stored)."""
    array, affine_lps = read_image_grid(path)
    frames, rows, cols = array.shape
    series_uid = deterministic_uid("evaluate", case, path.name)
    datasets = []
    for k in range(frames):
        ds = Dataset()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = deterministic_uid("evaluate", case, path.name, str(k))
        ds.Modality = modality
        ds.Rows, ds.Columns = rows, cols
        datasets.append(ds)
    return Volume(
        array=array.astype(np.float32, copy=False),
        datasets=datasets,
        paths=[path] * frames,
        spacing=_spacing(affine_lps),
        affine_lps=affine_lps,
        modality=modality,
    )


def has_patient_geometry(ds: Dataset) -> bool:
    return all(
        ds.get(k) is not None for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
    )


def projection_volume(path: Path) -> Volume:
    """A single 2-D DICOM image without patient geometry (CR/DX/MG/SC) as a one-frame Volume."""
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except (PydicomInvalidDicomError, OSError, ValueError, AttributeError, RuntimeError) as exc:
        raise InvalidDicomError(f"{path.name}: not a decodable DICOM image: {exc}") from exc
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if pixels.ndim != 2 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidDicomError(f"instance {sop_uid}: only single-frame grayscale images are supported")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() - values  # higher = brighter for the models, as infer.volume does
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    dy, dx = (float(v) for v in spacing)
    affine = np.diag([dx, dy, 1.0, 1.0])
    del ds.PixelData  # headers only, like load_series
    return Volume(
        array=values[None],
        datasets=[ds],
        paths=[path],
        spacing=(1.0, dy, dx),
        affine_lps=affine,
        modality=str(ds.get("Modality", "")),
    )


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data, header = nrrd.read(str(path))
    except (nrrd.NRRDError, OSError, ValueError) as exc:
        raise InvalidDicomError(f"{path.name}: not a readable NRRD image: {exc}") from exc
    space = str(header.get("space", "")).lower()
    if space not in _NRRD_SPACES:
        raise InvalidDicomError(
            f"{path.name}: NRRD space {header.get('space')!r} is not one of "
            "left-posterior-superior, right-anterior-superior, left-anterior-superior"
        )
    directions = header.get("space directions")
    origin = header.get("space origin")
    if directions is None or origin is None:
        raise InvalidDicomError(f"{path.name}: NRRD without 'space directions' and 'space origin'")
    directions = np.asarray(directions, dtype=np.float64)
    if directions.ndim != 2 or directions.shape[1] != 3 or not np.isfinite(directions).all():
        raise InvalidDicomError(f"{path.name}: NRRD space directions must be 3-D vectors, one per axis")
    units = header.get("space units")
    if units is not None and any(str(u) not in ("mm", "") for u in units):
        raise InvalidDicomError(f"{path.name}: NRRD space units {list(units)} are not mm")
    affine = np.eye(4)
    affine[:3, : directions.shape[0]] = directions.T  # one column per array axis
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    affine = np.diag([*_NRRD_SPACES[space], 1.0]) @ affine
    if directions.shape[0] == 2:  # a 2-D image: a unit step along the normal for the missing axis
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        affine[:3, 2] = normal / np.linalg.norm(normal)
    return data, affine


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InvalidDicomError(f"{path.name}: image has shape {data.shape}: only 2-D and 3-D are supported")
    return data


def _frames_along_normal(array: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip the frame axis when frames run against row x column (keeps DICOM's frame convention)."""
    normal = np.cross(affine_lps[:3, 0], affine_lps[:3, 1])
    if float(normal @ affine_lps[:3, 2]) >= 0:
        return array, affine_lps
    flipped = affine_lps.copy()
    flipped[:3, 3] = affine_lps[:3, 3] + affine_lps[:3, 2] * (array.shape[0] - 1)
    flipped[:3, 2] = -affine_lps[:3, 2]
    return np.ascontiguousarray(array[::-1]), flipped


def _spacing(affine_lps: np.ndarray) -> tuple[float, float, float]:
    dx, dy, dz = (float(v) for v in np.linalg.norm(affine_lps[:3, :3], axis=0))
    return dz, dy, dx
