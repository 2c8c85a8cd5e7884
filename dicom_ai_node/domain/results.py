"""Pure types describing what a model produced and who produced it (no I/O, no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept (PS3.3 Table 8.8-1): value, scheme designator, meaning."""

    value: str
    scheme_designator: str
    meaning: str


# SNOMED CT codes used by the built-in models (PS3.16 CID 7150 / CID 7151).
SCT_ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
SCT_BRAIN = CodedConcept("12738006", "SCT", "Brain")
SCT_LEFT_LUNG = CodedConcept("44029006", "SCT", "Left lung")
SCT_RIGHT_LUNG = CodedConcept("3341006", "SCT", "Right lung")
SCT_LUNG = CodedConcept("39607008", "SCT", "Lung")


@dataclass(frozen=True)
class SegmentSpec:
    """One label a segmentation model can output.

    `label_value` is the integer in the model's label map; `rgb` is the display colour (converted to
    CIELab for RecommendedDisplayCIELabValue when encoding).
    """

    label_value: int
    label: str
    category: CodedConcept
    property_type: CodedConcept
    rgb: tuple[int, int, int]
    anatomic_region: CodedConcept | None = None


@dataclass(frozen=True)
class FindingSpec:
    """One finding a classification model scores (e.g. "Pneumothorax"), reported in the SR as a
    qualitative evaluation: present when the probability reaches `threshold`, absent otherwise."""

    finding: CodedConcept
    threshold: float = 0.5


@dataclass(frozen=True)
class FindingResult:
    """A classifier's answer for one finding: the probability (0..1) and the thresholded decision."""

    spec: FindingSpec
    probability: float

    @property
    def present(self) -> bool:
        return self.probability >= self.spec.threshold


@dataclass(frozen=True)
class ModelIdentity:
    """Algorithm identification (PS3.3 C.8.20.2 / Algorithm Identification Sequence)."""

    name: str
    version: str
    family: CodedConcept = CodedConcept("123110", "DCM", "Artificial Intelligence")
    description: str = ""


@dataclass(frozen=True)
class RuleIdentity:
    """Which routing rule (and which version of it) caused a result."""

    rule_id: str
    rule_version: int


@dataclass(frozen=True)
class OutputIdentity:
    """Equipment identity written into every result object; comes from config, never random."""

    manufacturer: str = "dicom-ai-node project"
    manufacturer_model_name: str = "dicom-ai-node"
    software_versions: str = "0.1.0"
    device_serial_number: str = "dicom-ai-node-1"
    institution_name: str = ""
    station_name: str = "AINODE"
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    seg_series_description_prefix: str = "AI SEG"
    sr_series_description_prefix: str = "AI SR"


@dataclass(frozen=True)
class ResultUids:
    """Deterministic UIDs of the result objects for one (series, model, rule) triple."""

    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str


@dataclass(frozen=True)
class SegmentMeasurement:
    """Volume of one segment on the source grid (what the SR reports)."""

    label_value: int
    label: str
    voxel_count: int
    volume_cm3: float


@dataclass
class ModelOutput:
    """What a segmentation model returns: a label map on the exact source grid.

    `label_map` has shape (frames, rows, columns) in the order of the source instances as sorted by
    the volume loader; 0 is background.
    """

    label_map: object  # numpy.ndarray[uint8]; typed loosely to keep domain free of numpy
    segments: list[SegmentSpec] = field(default_factory=list)
