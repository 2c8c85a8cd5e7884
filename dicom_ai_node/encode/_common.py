"""Small helpers shared by the SEG and SR encoders."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DS

from dicom_ai_node.domain.results import CodedConcept, ModelIdentity, OutputIdentity, RuleIdentity
from dicom_ai_node.errors import EncodeError

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
    """`ds`, or a copy of it with the missing Type 2 patient/study attributes present and empty and its
    SpecificCharacterSet spelled as highdicom accepts it (`_highdicom_character_set`).

    highdicom copies patient and study attributes, and SpecificCharacterSet, from this first source.
    """
    missing = [keyword for keyword in _TYPE2_IDENTITY if keyword not in ds]
    charset = _highdicom_character_set(ds.get("SpecificCharacterSet"))
    respell = charset != ds.get("SpecificCharacterSet")
    if not missing and not respell:
        return ds
    patched = copy.deepcopy(ds)  # never modify the caller's dataset
    for keyword in missing:
        setattr(patched, keyword, "")
    if respell and charset is None:
        del patched.SpecificCharacterSet
    elif respell:
        patched.SpecificCharacterSet = charset
    return patched


def _highdicom_character_set(value: Any) -> str | list[str] | None:
    """The SpecificCharacterSet `value` spelled so that highdicom 0.28 takes it, same meaning: None
    (absent: the default repertoire) for an empty value or "ISO_IR 6", and "ISO 2022 IR 6" for an empty
    value 1 with code extensions (PS3.3 C.12.1.1.2; the usual Japanese "\\ISO 2022 IR 87"), both of
    which highdicom refuses as written."""
    if value is None:
        return None
    values = [value.strip()] if isinstance(value, str) else [str(v).strip() for v in value]
    if not any(values) or values == ["ISO_IR 6"]:
        return None
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    return values[0] if len(values) == 1 else values


def _has_value(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds[keyword].value not in (None, "", [])


def with_slice_thickness(source_datasets: Sequence[Dataset]) -> Dataset:
    """The first source header, or a copy of it whose empty or absent SliceThickness is derived.

    SliceThickness is Type 2 in the Image Plane module (reformatted and derived series leave it empty
    or out), but highdicom 0.28 reads `source_images[0].SliceThickness` for the SEG's Pixel Measures
    whatever is passed as `pixel_measures` (and keeps the source's measures when the pixel spacing
    agrees), so the header it gets must carry one. Derived, as the grid itself, from the positions: the
    mean step of ImagePositionPatient along the normal of ImageOrientationPatient (the headers are in
    slice order); a single slice takes SpacingBetweenSlices.
    """
    first = source_datasets[0]
    if _has_value(first, "SliceThickness"):
        return first
    series_uid = first.get("SeriesInstanceUID", "?")
    try:
        if len(source_datasets) > 1:
            iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
            normal = np.cross(iop[:3], iop[3:])
            positions = np.array(
                [[float(v) for v in ds.ImagePositionPatient] for ds in source_datasets], dtype=np.float64
            )
            along = positions @ (normal / np.linalg.norm(normal))
            thickness = abs(float(along[-1] - along[0])) / (len(source_datasets) - 1)
        else:
            thickness = (
                float(first.SpacingBetweenSlices) if _has_value(first, "SpacingBetweenSlices") else 0.0
            )
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodeError(
            f"series {series_uid}: SliceThickness is empty or absent and cannot be derived: {exc}"
        ) from exc
    if not thickness > 0:
        raise EncodeError(
            f"series {series_uid}: SliceThickness is empty or absent and cannot be derived from "
            "ImagePositionPatient (a single slice, or all at one position)"
        )
    patched = copy.deepcopy(first)  # never modify the caller's dataset
    patched.SliceThickness = DS(thickness, auto_format=True)
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
