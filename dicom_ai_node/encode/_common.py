"""Small helpers shared by the SEG and SR encoders."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_ai_node.domain.results import CodedConcept, ModelIdentity, OutputIdentity, RuleIdentity

LONG_STRING_MAX = 64  # LO (PS3.5 6.2)

# Type 2 attributes highdicom reads unconditionally from the first source/evidence header;
# de-identified or sloppy sources sometimes drop them entirely, which must not cost the result.
_TYPE2_IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def with_type2_identity(ds: Dataset) -> Dataset:
    """`ds`, or a copy of it with the missing Type 2 patient/study attributes present and empty."""
    missing = [keyword for keyword in _TYPE2_IDENTITY if keyword not in ds]
    if not missing:
        return ds
    patched = copy.deepcopy(ds)  # never modify the caller's dataset
    for keyword in missing:
        setattr(patched, keyword, "")
    return patched


def hd_code(concept: CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning)


def rule_parameters(rule: RuleIdentity) -> dict[str, str]:
    """The rule identity as algorithm parameters (written to the SEG and the SR alike)."""
    return {"rule_id": rule.rule_id, "rule_version": str(rule.rule_version)}


def series_description(prefix: str, model: ModelIdentity, revision: int = 1) -> str:
    """SeriesDescription of a result series (LO: at most 64 characters).

    A revision (results re-made after late images) says so, so a reader sees which series supersedes which.
    """
    suffix = f" rev {revision}" if revision > 1 else ""
    return f"{prefix} {model.name}"[: LONG_STRING_MAX - len(suffix)] + suffix


@contextlib.contextmanager
def no_phi_warnings() -> Iterator[None]:
    """Silence highdicom's warning about a single-component person name: it quotes the name (PHI)
    into the warning text, which logging.captureWarnings would copy into our logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* is unlikely to represent", category=UserWarning
        )
        yield


# DCM 109102 "Processing Equipment" (PS3.16 CID 7005 Contributing Equipment Purposes of Reference).
PROCESSING_EQUIPMENT = hd.sr.CodedConcept("109102", "DCM", "Processing Equipment")


def contributing_equipment(identity: OutputIdentity, model: ModelIdentity) -> list[hd.ContributingEquipment]:
    """IHE AI Results: name the equipment (this node) and the algorithm (model + version) that made a result."""
    return [
        hd.ContributingEquipment(
            manufacturer=identity.manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=identity.manufacturer_model_name,
            software_versions=[identity.software_versions, f"{model.name} {model.version}"],
            device_serial_number=identity.device_serial_number,
            institution_name=identity.institution_name or None,
            station_name=identity.station_name or None,
            contribution_description=f"AI inference by {model.name} {model.version}"[:LONG_STRING_MAX],
        )
    ]
