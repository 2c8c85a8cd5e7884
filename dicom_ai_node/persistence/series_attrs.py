"""The attributes routing rules match on, built from a stored series row."""

from __future__ import annotations

from typing import Any

from dicom_ai_node.persistence.repository import SeriesRow


def series_attributes(row: SeriesRow) -> dict[str, Any]:
    """Keyed by DICOM keyword, plus the node facts CallingAETitle and NumberOfInstances."""
    attrs: dict[str, Any] = dict(row.header)
    attrs.update(
        Modality=row.modality or attrs.get("Modality"),
        BodyPartExamined=row.body_part_examined or attrs.get("BodyPartExamined"),
        SeriesDescription=row.series_description or attrs.get("SeriesDescription"),
        SOPClassUID=row.sop_class_uid,
        CallingAETitle=row.calling_ae,
        NumberOfInstances=row.instance_count,
    )
    return attrs
