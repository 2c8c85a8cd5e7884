"""A corpus of odd series, built on the fly: pydicom's own odd test files and synthetic series whose
geometry or encoding breaks what a simple loader assumes (issue 12, "Bad input" at the series level).

Each entry says what the node must do with it: refuse every instance at receive with a named C-STORE
status, deliver a result, or dead-letter the infer job at once with a reason that names what is wrong.
The pydicom files come from the installed package (`get_testdata_file(..., download=False)`): nothing is
fetched. Two tiny models (no torch) stand in for real ones, so only the node's own handling is measured:
`odd_registry` is module level so the inference host's spawned child can import it by reference.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from dicom_ai_node.devtools.synthetic import write_cr_image, write_ct_series
from dicom_ai_node.domain.results import (
    SCT_ANATOMICAL_STRUCTURE,
    CodedConcept,
    FindingResult,
    FindingSpec,
    ModelIdentity,
    SegmentSpec,
)
from dicom_ai_node.infer.registry import ModelRegistry
from dicom_ai_node.infer.volume import Volume

SEGMENTER = "odd-midrange"
CLASSIFIER = "odd-bright"
SCT_TISSUE = CodedConcept("85756007", "SCT", "Tissue")
BRIGHT_AREA = FindingSpec(CodedConcept("TEST002", "99TEST", "Bright area"), threshold=0.5)

# The CT phantom of devtools/synthetic.py, small: 32 x 32 pixels of 0.8 mm, 2.5 mm slices.
ROWS = COLS = 32
STEP_MM = 2.5
GANTRY_TILT_DEG = 20.0

Outcome = Literal["refused", "succeeded", "dead"]


def _midrange_mask(volume: Volume) -> np.ndarray:
    low, high = float(volume.array.min()), float(volume.array.max())
    return (volume.array > (low + high) / 2).astype(np.uint8)


class MidrangeSegmenter:
    """Label 1 above the middle of the volume's own value range: never empty for a non-flat image,
    whatever the modality or units, so every series that loads gets a SEG."""

    task: Literal["segmentation"] = "segmentation"
    accepts_modalities: tuple[str, ...] = ("CT", "MR", "OT")

    def __init__(self) -> None:
        self.identity = ModelIdentity(SEGMENTER, "1.0")
        self.segments = [
            SegmentSpec(1, "Bright tissue", SCT_ANATOMICAL_STRUCTURE, SCT_TISSUE, (200, 160, 60))
        ]

    def segment(self, volume: Volume) -> np.ndarray:
        return _midrange_mask(volume)


class MidrangeClassifier:
    """The fraction of pixels above the middle of the value range, as the probability of one finding.
    After MONOCHROME1 is inverted it is the complement of what the stored values give."""

    task: Literal["classification"] = "classification"
    accepts_modalities: tuple[str, ...] = ("CR", "DX")

    def __init__(self) -> None:
        self.identity = ModelIdentity(CLASSIFIER, "1.0")
        self.findings = [BRIGHT_AREA]

    def classify(self, volume: Volume) -> list[FindingResult]:
        return [FindingResult(BRIGHT_AREA, float(_midrange_mask(volume).mean()))]


def odd_registry() -> ModelRegistry:
    registry = ModelRegistry()
    registry.register(SEGMENTER, MidrangeSegmenter)
    registry.register(CLASSIFIER, MidrangeClassifier)
    return registry


def rules_yaml(destination: str, quiet_period_s: float) -> str:
    """Routing for the corpus: cross-sectional series to the segmenter, radiographs to the classifier."""
    return f"""rules:
  - id: odd-cross-sectional
    version: 1
    conditions:
      - {{attribute: Modality, in: [CT, MR, OT]}}
    action: {{model: {SEGMENTER}, destinations: [{destination}], quiet_period_s: {quiet_period_s}}}
  - id: odd-radiograph
    version: 1
    conditions:
      - {{attribute: Modality, in: [CR, DX]}}
    action: {{model: {CLASSIFIER}, destinations: [{destination}], quiet_period_s: {quiet_period_s}}}
"""


@dataclass(frozen=True)
class OddSeries:
    """One corpus entry: its files (sent as written, in their own transfer syntax) and what must happen.

    `status`: the C-STORE status every instance gets. `outcome`: "refused" (nothing stored), "succeeded"
    (results delivered) or "dead" (infer job dead-lettered on its first attempt). `reason`: a regular
    expression the dead job's error must match (it names what is wrong). `why`: the one line for the
    outcome table in docs/reliability.md.
    """

    name: str
    files: list[Path]
    series_instance_uid: str
    outcome: Outcome
    status: int = 0x0000
    reason: str = ""
    why: str = ""
    frames: int | None = None  # frames of the delivered SEG, when it must differ from the instance count
    names: dict[str, str] = field(default_factory=dict)  # PatientName the results must carry unchanged
    held_back: Path | None = None  # an instance of the series not in `files` (sent later)


# --- building blocks --------------------------------------------------------------------------------------


def _ct(directory: Path, n_slices: int = 5) -> list[Path]:
    return write_ct_series(directory, n_slices=n_slices, rows=ROWS, cols=COLS, slice_thickness=STEP_MM)


def _edit(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = dcmread(path)
    change(ds)
    ds.save_as(path)


def _series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _move_along_normal(path: Path, offset_mm: float) -> None:
    def move(ds: Dataset) -> None:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        position = np.array([float(v) for v in ds.ImagePositionPatient]) + normal * offset_mm
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position @ normal), 4)

    _edit(path, move)


def _extra_instance(source: Path, target: Path, change: Callable[[Dataset], None]) -> Path:
    """A new instance of `source`'s series (fresh SOP Instance UID, next InstanceNumber), then `change`."""
    ds = dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = int(ds.InstanceNumber) + 100
    change(ds)
    ds.save_as(target)
    return target


def _into_series(ds: Dataset, reference: Path) -> None:
    """Make `ds` an instance of `reference`'s series (study, series, frame of reference)."""
    ref = dcmread(reference, stop_before_pixels=True)
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = ref.SeriesInstanceUID
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID


def _pydicom_file(name: str, directory: Path) -> Path:
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom test file {name} is not installed with pydicom")
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(found, directory / name))


# --- the corpus ---------------------------------------------------------------------------------------


def _pydicom_deflate(d: Path) -> OddSeries:
    [path] = [_pydicom_file("image_dfl.dcm", d)]
    return OddSeries(
        "pydicom-deflate-secondary-capture",
        [path],
        _series_uid(path),
        "dead",
        reason=r"SeriesGeometryError: .*ImageOrientationPatient is absent.*PixelSpacing is absent.*cannot be derived",
        why="Deflated Explicit VR Little Endian inflates fine, but this Secondary Capture (OT) has no Image "
        "Plane module: no position or spacing to put a segmentation on, so the geometry error names the "
        "missing attributes",
    )


def _deflated_ct(d: Path) -> OddSeries:
    files = _ct(d)
    for path in files:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    return OddSeries(
        "deflated-ct-series",
        files,
        _series_uid(files[0]),
        "succeeded",
        why="a deflated data set is a transfer syntax like any other once inflated: results as usual",
    )


def _pydicom_big_endian(d: Path) -> OddSeries:
    path = _pydicom_file("MR_small_bigendian.dcm", d)
    return OddSeries(
        "pydicom-big-endian-mr",
        [path],
        _series_uid(path),
        "succeeded",
        why="Explicit VR Big Endian (retired, still sent by old modalities) is stored as received and "
        "decoded by pydicom; one signed 16-bit slice with its SliceThickness: results as usual",
    )


def _pydicom_truncated(d: Path) -> OddSeries:
    path = _pydicom_file("MR_truncated.dcm", d)
    return OddSeries(
        "pydicom-truncated-pixel-data",
        [path],
        _series_uid(path),
        "refused",
        status=0xC212,
        why="the file ends inside its Pixel Data: the element declares 8192 bytes and 8130 follow, so it "
        "is refused at receive from the declared length alone (0xC212, element past the end), nothing stored",
    )


def _pydicom_jpeg2000_iso2022(d: Path) -> OddSeries:
    path = _pydicom_file("J2K_pixelrep_mismatch.dcm", d)
    ds = dcmread(path, stop_before_pixels=True)
    return OddSeries(
        "pydicom-jpeg2000-iso2022-tilted-ct",
        [path],
        str(ds.SeriesInstanceUID),
        "succeeded",
        names={"PatientName": str(ds.PatientName)},
        why="a real CT slice: JPEG 2000 whose codestream disagrees with PixelRepresentation, "
        "ISO 2022 IR 13/87 (Japanese) character sets and a 22 degree tilted plane: decoded, results on "
        "the source plane",
    )


def _monochrome1_cr(d: Path) -> OddSeries:
    path = write_cr_image(d, brightness=0.8, rows=64, cols=64)
    _edit(path, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    return OddSeries(
        "monochrome1-cr",
        [path],
        _series_uid(path),
        "succeeded",
        why="MONOCHROME1 (low values bright, as CR and DX often write) is inverted before the model "
        "sees it, so the classifier scores what a reader sees",
    )


def _enhanced_multiframe(d: Path) -> OddSeries:
    legacy = [dcmread(p) for p in _ct(d / "single", n_slices=4)]
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = d / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return OddSeries(
        "enhanced-multiframe-ct",
        [path],
        str(enhanced.SeriesInstanceUID),
        "dead",
        reason=r"InvalidDicomError: series .*: instance .* is multi-frame \(4 frames, "
        r"Legacy Converted Enhanced CT Image Storage\)",
        why="an enhanced (multi-frame) image keeps its geometry in per-frame functional groups, which "
        "the loader does not read yet: refused by name rather than guessed",
    )


def _missing_slice(d: Path) -> OddSeries:
    files = _ct(d, n_slices=6)
    (d / "held-back").mkdir()
    held_back = files[3].rename(d / "held-back" / files[3].name)
    kept = [p for p in files if p.exists()]
    return OddSeries(
        "missing-slice",
        kept,
        _series_uid(kept[0]),
        "dead",
        held_back=held_back,
        reason=r"1 slice missing between z=.* and z=.* mm \(step 2\.50 mm",
        why="a gap is an incomplete series (an instance lost or still on its way): a model run on it "
        "would measure a volume with a hole, and interpolating would invent anatomy. Refused; sending "
        "the missing instance re-opens the series and it runs again",
    )


def _uneven_spacing(d: Path) -> OddSeries:
    files = _ct(d, n_slices=6)
    for path in files[3:]:
        _move_along_normal(path, 1.0)
    return OddSeries(
        "uneven-spacing",
        files,
        _series_uid(files[0]),
        "dead",
        reason=r"uneven slice spacing: steps of 2\.50 to 3\.50 mm",
        why="one affine cannot describe the slices, so volumes and any resampling would be wrong; "
        "refused rather than run on a mean step",
    )


def _duplicate_position(d: Path) -> OddSeries:
    files = _ct(d)

    def other_image(ds: Dataset) -> None:
        pixels = np.frombuffer(ds.PixelData, dtype="<u2") + np.uint16(200)
        ds.PixelData = pixels.astype("<u2").tobytes()

    extra = _extra_instance(files[2], d / "duplicate.dcm", other_image)
    return OddSeries(
        "duplicate-position-other-image",
        [*files, extra],
        _series_uid(files[0]),
        "dead",
        reason=r"duplicate slice position at z=.* mm: instances .* and .* hold different images",
        why="two different images at one position are two volumes in one series (phases, echoes, "
        "reconstructions): picking one would be arbitrary, so the series is refused",
    )


def _duplicate_copy(d: Path) -> OddSeries:
    files = _ct(d)
    extra = _extra_instance(files[2], d / "copy.dcm", lambda ds: None)
    return OddSeries(
        "duplicate-position-same-image",
        [*files, extra],
        _series_uid(files[0]),
        "succeeded",
        frames=len(files),
        why="the same image re-sent under a new SOP Instance UID adds nothing: one copy is kept, results "
        "as usual",
    )


def _mixed_orientation(d: Path) -> OddSeries:
    files = _ct(d, n_slices=4)

    def sagittal(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]

    extra = _extra_instance(files[0], d / "sagittal.dcm", sagittal)
    return OddSeries(
        "mixed-orientations",
        [*files, extra],
        _series_uid(files[0]),
        "dead",
        reason=r"series .* has 2 orientations: ImageOrientationPatient \[1, 0, 0, 0, 1, 0\] \(4 instances\) "
        r"and \[0, 1, 0, 0, 0, -1\] \(1 instance\)",
        why="planes in two orientations (a localizer or a reformat mixed in) are not one volume",
    )


def _mixed_sizes(d: Path) -> OddSeries:
    files = _ct(d, n_slices=4)
    [small] = write_ct_series(d / "small", n_slices=1, rows=16, cols=16, slice_thickness=STEP_MM)
    ds = dcmread(small)
    _into_series(ds, files[0])
    ds.ImagePositionPatient = list(dcmread(files[-1]).ImagePositionPatient)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + STEP_MM
    target = d / "small.dcm"
    ds.save_as(target)
    return OddSeries(
        "mixed-sizes",
        [*files, target],
        _series_uid(files[0]),
        "dead",
        reason=r"Rows/Columns differ: 32x32 \(4 instances\) and 16x16 \(1 instance\)",
        why="images of two matrix sizes do not stack into one volume",
    )


def _gantry_tilt(d: Path) -> OddSeries:
    files = _ct(d)
    tilt = math.radians(GANTRY_TILT_DEG)
    first = dcmread(files[0], stop_before_pixels=True)
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    for k, path in enumerate(files):

        def tilted(ds: Dataset, k: int = k) -> None:
            # The gantry tilts the image plane about the patient's x axis; the table still moves along z.
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt)]
            ds.ImagePositionPatient = [round(float(v), 4) for v in origin + np.array([0.0, 0.0, STEP_MM * k])]
            ds.SliceLocation = round(float(origin[2]) + STEP_MM * k, 4)
            ds.GantryDetectorTilt = GANTRY_TILT_DEG

        _edit(path, tilted)
    return OddSeries(
        "gantry-tilt",
        files,
        _series_uid(files[0]),
        "succeeded",
        why="a tilted gantry gives evenly spaced parallel planes whose step is not along their normal: "
        "the affine takes the step vector (a sheared grid), the SEG sits on the source planes and "
        "volumes use the true voxel volume. No resampling: the result must overlay the images as acquired",
    )


def _charset(
    name: str, charset: str | list[str], patient_name: str, description: str
) -> Callable[[Path], OddSeries]:
    def build(d: Path) -> OddSeries:
        files = _ct(d, n_slices=3)
        for path in files:

            def encode(ds: Dataset) -> None:
                ds.SpecificCharacterSet = charset
                ds.PatientName = patient_name
                ds.SeriesDescription = description

            _edit(path, encode)
        return OddSeries(
            name,
            files,
            _series_uid(files[0]),
            "succeeded",
            names={"PatientName": patient_name},
            why=f"SpecificCharacterSet {charset if isinstance(charset, str) else chr(92).join(charset)}: "
            "names and descriptions decode on receive and are copied into SEG and SR unchanged",
        )

    return build


CORPUS: dict[str, Callable[[Path], OddSeries]] = {
    "pydicom-deflate-secondary-capture": _pydicom_deflate,
    "deflated-ct-series": _deflated_ct,
    "pydicom-big-endian-mr": _pydicom_big_endian,
    "pydicom-truncated-pixel-data": _pydicom_truncated,
    "pydicom-jpeg2000-iso2022-tilted-ct": _pydicom_jpeg2000_iso2022,
    "monochrome1-cr": _monochrome1_cr,
    "enhanced-multiframe-ct": _enhanced_multiframe,
    "missing-slice": _missing_slice,
    "uneven-spacing": _uneven_spacing,
    "duplicate-position-other-image": _duplicate_position,
    "duplicate-position-same-image": _duplicate_copy,
    "mixed-orientations": _mixed_orientation,
    "mixed-sizes": _mixed_sizes,
    "gantry-tilt": _gantry_tilt,
    "latin1-iso-ir-100": _charset("latin1-iso-ir-100", "ISO_IR 100", "Müller^Jörg", "Thorax nativ Größe"),
    "utf8-iso-ir-192": _charset("utf8-iso-ir-192", "ISO_IR 192", "Wang^XiaoDong=王^小東", "胸部 CT 平扫"),
    "iso2022-ir87-japanese": _charset(
        "iso2022-ir87-japanese",
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "胸部ＣＴ",
    ),
}


def build_corpus(directory: Path) -> list[OddSeries]:
    """Every corpus entry, each in its own folder under `directory`."""
    return [build(directory / name) for name, build in CORPUS.items()]


def transfer_syntax_of(path: Path) -> UID:
    return UID(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
