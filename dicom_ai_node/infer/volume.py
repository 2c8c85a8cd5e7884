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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_ai_node.errors import InferenceError, InvalidDicomError, SeriesGeometryError
from dicom_ai_node.infer.decode import decode_into, decode_workers

log = logging.getLogger(__name__)

# Tolerances: scanners write IOP with ~6 significant digits and rounding differs per instance.
_IOP_TOLERANCE = 1e-3
_SPACING_TOLERANCE_MM = 1e-3
# Positions closer than this along the normal are the same slice (a re-sent or duplicated instance).
_DUPLICATE_POSITION_MM = 1e-3
# Relative spread of slice gaps above which we warn that the affine uses the mean step.
_GAP_SPREAD_WARNING = 0.01
# A slice step may differ from the series' median step by this much (the larger of the two) before the
# series is not one regular grid (a missing slice, variable spacing): positions are written rounded,
# some scanners to 0.1 mm, so the absolute part covers rounding; a missing slice doubles a step.
_STEP_TOLERANCE_REL = 0.02
_STEP_TOLERANCE_MM = 0.1
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


def load_series(
    paths: Sequence[Path], allocate: Callable[[tuple[int, int, int]], np.ndarray] | None = None
) -> Volume:
    """Read, check, sort and decode the single-frame instances of one series.

    The frames are decoded into `allocate((frames, rows, cols))`, a float32 array (default: a new one in
    memory; the worker passes its inference host's, a file shared with the inference process).

    Raises InvalidDicomError when a file is unreadable, the instances do not form one regular grid
    (different series, matrix, orientation or pixel spacing; missing slices, uneven spacing, two
    different images at one position), or pixel data is colour or multi-frame; SeriesGeometryError
    (naming the attribute) when the geometry cannot be derived. Both come from the headers alone,
    before any pixel data is decoded (only instances at one position are decoded first, to tell a
    re-sent copy, which is dropped, from a second image). An empty or absent SliceThickness /
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

    shape = (len(headers), rows, cols)
    array = allocate(shape) if allocate is not None else np.empty(shape, dtype=np.float32)
    # Compressed frames decode in a few processes at once (decode.py: the JPEG 2000 decoder holds the GIL).
    compressed = any(
        UID(str(h.ds.file_meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)).is_compressed
        for h in headers
    )
    decode_into(array, _decode_frame, headers, decode_workers(len(headers), compressed))
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
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        # Enhanced images keep their geometry in per-frame functional groups, which this loader does not read.
        sop_class = UID(str(ds.get("SOPClassUID", "")))
        raise InvalidDicomError(
            f"series {series_uid}: instance {sop_uid} is multi-frame ({frames} frames, "
            f"{sop_class.name or 'unknown SOP class'}): only single-frame series are supported yet"
        )
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
    """All instances share one matrix, orientation and pixel spacing; otherwise the error says which
    values occur and how often (a localizer or reformat mixed in shows as the odd one out)."""
    first = headers[0]
    series_uid = str(first.ds.get("SeriesInstanceUID", ""))
    for header in headers[1:]:
        other_uid = str(header.ds.get("SeriesInstanceUID", ""))
        if other_uid != series_uid:
            raise InvalidDicomError(f"series {series_uid}: instances of another series {other_uid} mixed in")
    sizes = _groups(headers, lambda h: np.array([int(h.ds.Rows), int(h.ds.Columns)]), 0.0)
    if len(sizes) > 1:
        listed = _listed(sizes, lambda v: f"{int(v[0])}x{int(v[1])}")
        raise InvalidDicomError(f"series {series_uid}: Rows/Columns differ: {listed}")
    orientations = _groups(headers, lambda h: np.concatenate([h.row_cosines, h.col_cosines]), _IOP_TOLERANCE)
    if len(orientations) > 1:
        listed = _listed(orientations, lambda v: "[" + ", ".join(_number(x) for x in v) + "]")
        raise InvalidDicomError(
            f"series {series_uid} has {len(orientations)} orientations: ImageOrientationPatient {listed}"
        )
    spacings = _groups(headers, lambda h: np.array(h.pixel_spacing), _SPACING_TOLERANCE_MM)
    if len(spacings) > 1:
        listed = _listed(spacings, lambda v: "\\".join(_number(x) for x in v))
        raise InvalidDicomError(f"series {series_uid}: PixelSpacing differs: {listed}")


def _groups(
    headers: list[_Header], value: Callable[[_Header], np.ndarray], tolerance: float
) -> list[tuple[np.ndarray, int]]:
    """Distinct values (within `tolerance`) in order of first appearance, with how many instances have each."""
    groups: list[tuple[np.ndarray, int]] = []
    for header in headers:
        v = value(header)
        for i, (seen, count) in enumerate(groups):
            if np.allclose(v, seen, atol=tolerance):
                groups[i] = (seen, count + 1)
                break
        else:
            groups.append((v, 1))
    return groups


def _listed(groups: list[tuple[np.ndarray, int]], show: Callable[[np.ndarray], str]) -> str:
    """'A (4 instances) and B (1 instance)'."""
    parts = [f"{show(v)} ({n} instance{'s' if n != 1 else ''})" for v, n in groups]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _number(value: float) -> str:
    # + 0.0 turns -0.0 into 0.0.
    return f"{round(float(value), 4) + 0.0:g}"


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
            _check_same_image(kept[-1], header, float(normal @ header.position))
            log.warning(
                "series %s: dropped instance %s at a duplicate position (same image as %s)",
                header.ds.get("SeriesInstanceUID", ""),
                header.ds.get("SOPInstanceUID", ""),
                kept[-1].ds.get("SOPInstanceUID", ""),
            )
            continue
        kept.append(header)
    return kept


def _check_same_image(kept: _Header, duplicate: _Header, z: float) -> None:
    """Two instances at one position may be one image sent twice under two SOP Instance UIDs (dropped),
    or two images: phases, echoes or reconstructions in one series, which are not one volume; picking
    either would be arbitrary, so that series is refused. Only duplicates are decoded for this."""
    if np.array_equal(_decode_frame(kept), _decode_frame(duplicate)):
        return
    series_uid = str(kept.ds.get("SeriesInstanceUID", ""))
    first, second = (str(h.ds.get("SOPInstanceUID", "")) for h in (kept, duplicate))
    where = f"InstanceNumber {z:g} (radiographs without a position)" if kept.projection else f"z={z:.2f} mm"
    raise InvalidDicomError(
        f"series {series_uid}: duplicate slice position at {where}: instances {first} and {second} hold "
        "different images (phases, echoes or reconstructions mixed in one series?)"
    )


def _decode_frame(header: _Header) -> np.ndarray:
    sop_uid = str(header.ds.get("SOPInstanceUID", ""))
    try:
        if header.ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # pydicom 3.0's pixel_array(path) reads a deflated file without inflating it and finds no Pixel
            # Data: read the whole data set (it is inflated in memory anyway).
            stored = pixel_array(pydicom.dcmread(header.path))
        else:
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
        if not first.projection:
            _check_even_steps(str(first.ds.get("SeriesInstanceUID", "")), positions @ normal)
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


def _check_even_steps(series_uid: str, z: np.ndarray) -> None:
    """Sorted slice positions along the normal must be evenly spaced: one affine describes the volume.

    A step that is a whole multiple of the usual one is a missing slice (an incomplete series: an
    instance lost or still on its way); any other irregular step is uneven spacing (e.g. two stacks of
    different thickness). Either way a model would see a distorted volume and volumes would be wrong, and
    interpolating would invent anatomy: the series is refused, naming where.
    """
    steps = np.diff(z)
    usual = float(np.median(steps))
    tolerance = max(_STEP_TOLERANCE_REL * usual, _STEP_TOLERANCE_MM)
    irregular = [i for i, step in enumerate(steps) if abs(float(step) - usual) > tolerance]
    if not irregular:
        return
    multiples = [float(steps[i]) / usual for i in irregular]
    first = irregular[0]
    between = f"z={float(z[first]):.2f} and z={float(z[first + 1]):.2f} mm"
    if all(
        m > 1.5 and abs(float(steps[i]) - round(m) * usual) <= tolerance * round(m)
        for i, m in zip(irregular, multiples, strict=True)
    ):
        missing = sum(round(m) - 1 for m in multiples)
        where = (
            f"between {between}"
            if len(irregular) == 1
            else f"in {len(irregular)} gaps, the first between {between}"
        )
        raise InvalidDicomError(
            f"series {series_uid}: {missing} slice{'s' if missing != 1 else ''} missing {where} "
            f"(step {usual:.2f} mm along the slice normal)"
        )
    raise InvalidDicomError(
        f"series {series_uid}: uneven slice spacing: steps of {float(steps.min()):.2f} to "
        f"{float(steps.max()):.2f} mm along the slice normal (usual step {usual:.2f} mm; the first "
        f"irregular one between {between})"
    )


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
