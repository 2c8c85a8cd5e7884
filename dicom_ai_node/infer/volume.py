"""Series -> volume: the first stage of inference.

Input: the spool paths of the single-frame instances of one series. Output: a `Volume` whose voxel
values are in modality units (HU for CT) and whose frames are sorted along the slice normal, plus the
headers (without pixel data) that the SEG encoder references, in the same order.

Geometry follows PS3.3 C.7.6.2.1.1: a voxel at column i, row j of an instance maps to
    IPP + i * PixelSpacing[1] * row_cosines + j * PixelSpacing[0] * column_cosines
(ImageOrientationPatient = row cosines, then column cosines; PixelSpacing = row spacing, column
spacing), in the patient LPS frame.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.pixels.utils import pixel_array

from dicom_ai_node.errors import InferenceError, InvalidDicomError, SeriesGeometryError

log = logging.getLogger(__name__)

# Tolerances: scanners write IOP with ~6 significant digits and rounding differs per instance.
_IOP_TOLERANCE = 1e-3
_SPACING_TOLERANCE_MM = 1e-3
# Positions closer than this along the normal are the same slice (a re-sent or duplicated instance).
_DUPLICATE_POSITION_MM = 1e-3
# Relative spread of slice gaps above which the series is not evenly spaced (missing slice, variable
# spacing); the affine then uses the mean step, so we warn.
_GAP_SPREAD_WARNING = 0.01
# A guard against declared sizes that would not fit in memory (decompression bombs, corrupt headers).
_MAX_VOXELS = 1 << 31

# Image Plane attributes (PS3.3 C.7.6.2) the grid is built from; SliceThickness and SpacingBetweenSlices
# are not among them: Type 2/3, often empty in reformatted or derived series, and the slice step comes
# from the positions along the normal anyway.
_PLANE_KEYWORDS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Projection radiography: images without an Image Plane module (no patient-space geometry).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "XA", "RF"})


@dataclass
class Volume:
    """A series as a 3-D array on its own grid.

    `array` is float32 (frames, rows, cols) in modality units; frame k comes from `datasets[k]` /
    `paths[k]`. `datasets` are headers only (no PixelData). `spacing` is (dz, dy, dx) in mm: the slice
    step along the normal, the row spacing and the column spacing. `affine_lps` maps the voxel index
    (col i, row j, frame k, 1) to patient LPS mm.
    """

    array: np.ndarray
    datasets: list[pydicom.Dataset]
    paths: list[Path]
    spacing: tuple[float, float, float]
    affine_lps: np.ndarray
    modality: str

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def shape(self) -> tuple[int, int, int]:
        frames, rows, cols = self.array.shape
        return int(frames), int(rows), int(cols)


@dataclass
class _Header:
    path: Path
    ds: pydicom.Dataset
    row_cosines: np.ndarray
    col_cosines: np.ndarray
    position: np.ndarray
    pixel_spacing: tuple[float, float]
    projection: bool = False  # a nominal plane (see _projection_header), not a patient position


def voxel_volume_mm3(volume: Volume) -> float:
    """Volume of one voxel in mm3 (|det| of the affine's 3x3 part: exact for tilted gantries too)."""
    return float(abs(np.linalg.det(volume.affine_lps[:3, :3])))


def load_series(paths: Sequence[Path]) -> Volume:
    """Read, check, sort and decode the single-frame instances of one series.

    Raises InvalidDicomError when a file is unreadable, the instances do not form one regular grid
    (different series, matrix, orientation or pixel spacing), or pixel data is colour or multi-frame;
    SeriesGeometryError (naming the attribute) when the geometry cannot be derived. Both come from
    the headers alone, before any pixel data is decoded. An empty or absent SliceThickness /
    SpacingBetweenSlices is no error: the slice step comes from the positions. MONOCHROME1 is
    inverted to MONOCHROME2 as (max - value) over the whole volume, after rescale, so that higher
    always means brighter for the models.
    """
    if not paths:
        raise InvalidDicomError("empty series: no instances given")
    headers = [_read_header(Path(p)) for p in paths]
    _check_one_grid(headers)
    headers = _sort_and_deduplicate(headers)
    series_uid = str(headers[0].ds.SeriesInstanceUID)
    # Geometry before pixels: a series whose grid cannot be derived fails here, cheaply.
    affine, spacing = _affine_and_spacing(headers)
    rows, cols = int(headers[0].ds.Rows), int(headers[0].ds.Columns)
    if len(headers) * rows * cols > _MAX_VOXELS:
        raise InvalidDicomError(f"series {series_uid}: {len(headers)}x{rows}x{cols} voxels is too large")

    photometric = {str(h.ds.get("PhotometricInterpretation", "MONOCHROME2")) for h in headers}
    if len(photometric) > 1:
        raise InvalidDicomError(f"series {series_uid}: mixed PhotometricInterpretation {sorted(photometric)}")

    array = np.empty((len(headers), rows, cols), dtype=np.float32)
    for k, header in enumerate(headers):
        array[k] = _decode_frame(header)
    if photometric == {"MONOCHROME1"}:
        np.subtract(array.max(), array, out=array)

    return Volume(
        array=array,
        datasets=[h.ds for h in headers],
        paths=[h.path for h in headers],
        spacing=spacing,
        affine_lps=affine,
        modality=str(headers[0].ds.get("Modality", "")),
    )


def to_nifti_ras(volume: Volume) -> nib.Nifti1Image:
    """The volume as a NIfTI image: data axes (i, j, k) = (col, row, frame), affine in RAS.

    NIfTI world space is RAS, DICOM patient space LPS: negate the first two rows of the affine.
    """
    data = np.ascontiguousarray(volume.array.transpose(2, 1, 0))
    affine = _LPS_TO_RAS @ volume.affine_lps
    image = nib.Nifti1Image(data, affine)
    # Scanner-based coordinates (code 1) for both, so readers agree on which affine to use.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def mask_from_nifti_grid(mask_xyz: np.ndarray, volume: Volume) -> np.ndarray:
    """Inverse of `to_nifti_ras` for arrays on exactly that grid: (cols, rows, frames) -> (frames, rows, cols)."""
    frames, rows, cols = volume.shape
    if mask_xyz.shape != (cols, rows, frames):
        raise InferenceError(
            f"series {volume.series_instance_uid}: mask shape {mask_xyz.shape} is not the NIfTI grid "
            f"{(cols, rows, frames)} of the volume"
        )
    return np.ascontiguousarray(mask_xyz.transpose(2, 1, 0))


def _read_header(path: Path) -> _Header:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (PydicomInvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidDicomError(f"unreadable DICOM file {path.name}: {exc}") from exc
    series_uid = str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>"))
    sop_uid = str(ds.get("SOPInstanceUID", "<no SOPInstanceUID>"))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InvalidDicomError(f"series {series_uid}: instance {sop_uid} is multi-frame: not supported yet")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidDicomError(
            f"series {series_uid}: instance {sop_uid} is colour: only grayscale supported"
        )
    if str(ds.get("Modality", "")) in PROJECTION_MODALITIES and ds.get("ImageOrientationPatient") is None:
        return _projection_header(path, ds, series_uid, sop_uid)
    missing = [keyword for keyword in ("Rows", "Columns") if ds.get(keyword) is None]
    if missing:
        raise InvalidDicomError(f"series {series_uid}: instance {sop_uid} lacks {', '.join(missing)}")
    _require_plane_attributes(ds, series_uid, sop_uid)
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as exc:
        raise InvalidDicomError(
            f"series {series_uid}: instance {sop_uid} has malformed geometry: {exc}"
        ) from exc
    if iop.shape != (6,) or ipp.shape != (3,) or row_spacing <= 0 or col_spacing <= 0:
        raise InvalidDicomError(f"series {series_uid}: instance {sop_uid} has malformed geometry")
    row_cosines, col_cosines = iop[:3], iop[3:]
    if not np.isclose(np.linalg.norm(row_cosines), 1, atol=1e-2) or not np.isclose(
        np.linalg.norm(col_cosines), 1, atol=1e-2
    ):
        raise InvalidDicomError(f"series {series_uid}: instance {sop_uid} has non-unit orientation cosines")
    return _Header(path, ds, row_cosines, col_cosines, ipp, (row_spacing, col_spacing))


def _absent_or_empty(ds: pydicom.Dataset, keyword: str) -> str | None:
    """'absent', 'empty' or None (has a value): pydicom reads an empty DS/IS element as None or ''."""
    if keyword not in ds:
        return "absent"
    value = ds[keyword].value
    if value is None or value == "" or (isinstance(value, Sequence) and len(value) == 0):
        return "empty"
    return None


def _require_plane_attributes(ds: pydicom.Dataset, series_uid: str, sop_uid: str) -> None:
    """The Image Plane attributes a patient-space grid needs must have values (Type 1 in PS3.3
    C.7.6.2, but derived and converted series drop or blank them): without one, no slice order,
    spacing or position can be derived, so the series fails before inference, naming the attribute."""
    lacking = [(keyword, state) for keyword in _PLANE_KEYWORDS if (state := _absent_or_empty(ds, keyword))]
    if lacking:
        listed = ", ".join(f"{keyword} is {state}" for keyword, state in lacking)
        raise SeriesGeometryError(
            series_uid,
            lacking[0][0],
            f"{listed} in instance {sop_uid}: the image geometry (slice order, spacing, position) cannot "
            "be derived",
        )


def _projection_header(path: Path, ds: pydicom.Dataset, series_uid: str, sop_uid: str) -> _Header:
    """A projection radiograph (CR, DX, ...) has no patient-space plane: give it a nominal one.

    Rows/columns become the x/y axes at the detector's pixel spacing (ImagerPixelSpacing when
    PixelSpacing is absent, as DX usually writes it; 1 mm when neither is present), and each image is
    its own "slice" at z = InstanceNumber, so a series of projections is never merged as duplicates.
    Only classifiers use such volumes: the geometry is not a patient position.
    """
    if ds.get("Rows") is None or ds.get("Columns") is None:
        raise InvalidDicomError(f"series {series_uid}: instance {sop_uid} lacks Rows, Columns")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]
    try:
        row_spacing, col_spacing = (float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise InvalidDicomError(
            f"series {series_uid}: instance {sop_uid} has malformed pixel spacing"
        ) from exc
    if row_spacing <= 0 or col_spacing <= 0:
        raise InvalidDicomError(f"series {series_uid}: instance {sop_uid} has malformed pixel spacing")
    position = np.array([0.0, 0.0, float(ds.get("InstanceNumber", 1) or 1)])
    return _Header(
        path,
        ds,
        np.array([1.0, 0.0, 0.0]),
        np.array([0.0, 1.0, 0.0]),
        position,
        (row_spacing, col_spacing),
        projection=True,
    )


def _check_one_grid(headers: list[_Header]) -> None:
    first = headers[0]
    series_uid = str(first.ds.get("SeriesInstanceUID", ""))
    for header in headers[1:]:
        other_uid = str(header.ds.get("SeriesInstanceUID", ""))
        if other_uid != series_uid:
            raise InvalidDicomError(f"series {series_uid}: instances of another series {other_uid} mixed in")
        if (int(header.ds.Rows), int(header.ds.Columns)) != (int(first.ds.Rows), int(first.ds.Columns)):
            raise InvalidDicomError(f"series {series_uid}: instances differ in Rows/Columns")
        if not (
            np.allclose(header.row_cosines, first.row_cosines, atol=_IOP_TOLERANCE)
            and np.allclose(header.col_cosines, first.col_cosines, atol=_IOP_TOLERANCE)
        ):
            raise InvalidDicomError(f"series {series_uid}: instances differ in ImageOrientationPatient")
        if not np.allclose(header.pixel_spacing, first.pixel_spacing, atol=_SPACING_TOLERANCE_MM):
            raise InvalidDicomError(f"series {series_uid}: instances differ in PixelSpacing")


def _normal(header: _Header) -> np.ndarray:
    normal: np.ndarray = np.cross(header.row_cosines, header.col_cosines)
    return normal / float(np.linalg.norm(normal))


def _sort_and_deduplicate(headers: list[_Header]) -> list[_Header]:
    normal = _normal(headers[0])
    # InstanceNumber then SOPInstanceUID break ties, so which duplicate survives does not depend on
    # file order.
    ordered = sorted(
        headers,
        key=lambda h: (
            float(normal @ h.position),
            int(h.ds.get("InstanceNumber", 0) or 0),
            str(h.ds.get("SOPInstanceUID", "")),
        ),
    )
    kept = [ordered[0]]
    for header in ordered[1:]:
        if abs(float(normal @ (header.position - kept[-1].position))) < _DUPLICATE_POSITION_MM:
            log.warning(
                "series %s: dropped instance %s at a duplicate position",
                header.ds.get("SeriesInstanceUID", ""),
                header.ds.get("SOPInstanceUID", ""),
            )
            continue
        kept.append(header)
    return kept


def _decode_frame(header: _Header) -> np.ndarray:
    sop_uid = str(header.ds.get("SOPInstanceUID", ""))
    try:
        stored = pixel_array(header.path)
    except (
        OSError,
        ValueError,
        RuntimeError,
        NotImplementedError,
        AttributeError,
        PydicomInvalidDicomError,
    ) as exc:
        # pydicom raises RuntimeError/NotImplementedError for missing decoders, ValueError for corrupt data.
        raise InvalidDicomError(f"instance {sop_uid}: pixel data could not be decoded: {exc}") from exc
    rows, cols = int(header.ds.Rows), int(header.ds.Columns)
    if stored.shape != (rows, cols):
        raise InvalidDicomError(f"instance {sop_uid}: decoded shape {stored.shape} is not {(rows, cols)}")
    slope = float(header.ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.ds.get("RescaleIntercept", 0.0) or 0.0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _affine_and_spacing(headers: list[_Header]) -> tuple[np.ndarray, tuple[float, float, float]]:
    first = headers[0]
    row_spacing, col_spacing = first.pixel_spacing
    normal = _normal(first)
    if len(headers) > 1:
        positions = np.stack([h.position for h in headers])
        # The mean step vector (not normal * distance) keeps gantry-tilted series exact.
        step = (positions[-1] - positions[0]) / (len(headers) - 1)
        gaps = np.diff(positions @ normal)
        dz = float(gaps.mean())
        if float(gaps.max() - gaps.min()) > _GAP_SPREAD_WARNING * dz:
            log.warning(
                "series %s: uneven slice gaps %.3f..%.3f mm; using the mean %.3f mm",
                first.ds.get("SeriesInstanceUID", ""),
                gaps.min(),
                gaps.max(),
                dz,
            )
    else:
        dz = _single_slice_thickness(first)
        step = normal * dz
    affine = np.eye(4)
    affine[:3, 0] = first.row_cosines * col_spacing
    affine[:3, 1] = first.col_cosines * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    return affine, (dz, row_spacing, col_spacing)


def _single_slice_thickness(header: _Header) -> float:
    """The through-plane size of a one-slice series: SpacingBetweenSlices, else SliceThickness.

    With one slice there is no second position to derive it from; then a projection image gets a
    nominal 1 mm (only classifiers use it), and a cross-sectional one is a geometry error (a volume
    measured with a guessed thickness would be wrong).
    """
    series_uid = str(header.ds.get("SeriesInstanceUID", ""))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if _absent_or_empty(header.ds, keyword) is None:
            try:
                value = float(header.ds[keyword].value)
            except (TypeError, ValueError) as exc:
                raise SeriesGeometryError(series_uid, keyword, f"{keyword} is malformed: {exc}") from exc
            if value > 0:
                return value
    if header.projection:
        return 1.0
    raise SeriesGeometryError(
        series_uid,
        "SliceThickness",
        "SliceThickness and SpacingBetweenSlices are empty or absent and the series has a single slice: "
        "its slice thickness cannot be derived from positions",
    )
