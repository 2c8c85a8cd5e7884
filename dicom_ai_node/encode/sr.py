"""TID 1500 Measurement Report (Comprehensive SR) for a segmentation result, via highdicom.

One group per segment the model declares, in the model's order:
- found (voxel_count > 0): TID 1411 Volumetric ROI group referencing the SEG segment (with a
  "Source Series For Segmentation" reference instead of listing every source image), a Volume in
  UCUM cm3, and the qualitative evaluation "Presence of property" = Present;
- not found: TID 1501 group (no ROI to reference) with "Presence of property" = Absent and no
  measurement.
Each group carries TrackingIdentifier (segment label) + a deterministic TrackingUID (the same UID as
the SEG segment's TrackingUID), the finding category/type codes, and TID 4019 Algorithm
Identification with the model name/version and the rule as Algorithm Parameters
("rule_id=<id>", "rule_version=<n>").
The observer context is a device observer (TID 1004): this node (manufacturer, serial number) running
the model (Device Observer Name = model name, Device Observer Model Name = model version), with a
Device Observer UID derived from serial number + model name/version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_ai_node.domain.results import (
    CodedConcept,
    ModelIdentity,
    OutputIdentity,
    ResultUids,
    RuleIdentity,
    SegmentMeasurement,
    SegmentSpec,
)
from dicom_ai_node.encode._common import (
    contributing_equipment,
    hd_code,
    no_phi_warnings,
    rule_parameters,
    series_description,
    with_type2_identity,
)
from dicom_ai_node.encode.uids import device_observer_uid, segment_tracking_uid
from dicom_ai_node.errors import EncodeError

# Not "Finding" (DCM 121071): TID 1411/1501 already use that concept name for the finding type.
_PRESENCE = codes.DCM.PresenceOfProperty  # DCM 121052
_PRESENT = codes.SCT.Present  # SCT 52101004, CID 240 "Present-Absent"
_ABSENT = codes.SCT.Absent  # SCT 272519000, CID 240

# CID 100 "Quantitative Diagnostic Imaging Procedures"
_PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
}


def encode_sr(
    *,
    source_datasets: Sequence[Dataset],
    seg: Dataset | None,
    measurements: Sequence[SegmentMeasurement],
    model: ModelIdentity,
    rule: RuleIdentity,
    identity: OutputIdentity,
    uids: ResultUids,
    segments: Sequence[SegmentSpec] | None = None,
    revision: int = 1,
    predecessor: Dataset | None = None,
) -> Dataset:
    """Encode the measurements of one segmentation result as a Comprehensive SR (TID 1500).

    `seg` is the SEG from `encode_seg` for the same `uids`, or None when nothing was found (then the
    SR reports every segment as not found and lists the source instances as evidence).
    `segments` (the model's segment list; recommended) supplies the label and codes of each measured
    label value. Without it, found segments take them from the SEG, and not-found segments are
    reported by label only (there is no SEG item to take codes from).
    `revision` > 1 marks results re-made after late images; `predecessor` is the SR they supersede,
    referenced in the Predecessor Documents Sequence (PS3.3 C.17.2.3), never overwritten.
    """
    if not source_datasets:
        raise EncodeError("no source datasets")
    if not measurements:
        raise EncodeError("no measurements: a TID 1500 report needs at least one group")
    seg_items = _seg_items_by_tracking_uid(seg, uids)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"{key}={value}" for key, value in rule_parameters(rule).items()],
        family=hd_code(model.family),
    )
    source_series_uid = str(source_datasets[0].SeriesInstanceUID)

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for measurement in measurements:
        tracking_uid = segment_tracking_uid(uids, measurement.label_value)
        finding = _finding(measurement, segments, seg_items.get(tracking_uid))
        tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=finding.label)
        common: dict[str, Any] = {
            "tracking_identifier": tracking,
            "finding_type": _optional_code(finding.property_type),
            "finding_category": _optional_code(finding.category),
            "algorithm_id": algorithm,
            "finding_sites": (
                [hd.sr.FindingSite(hd_code(finding.anatomic_region))] if finding.anatomic_region else None
            ),
        }
        if measurement.voxel_count == 0:
            absent = hd.sr.QualitativeEvaluation(_PRESENCE, _ABSENT)
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(qualitative_evaluations=[absent], **common)
            )
            continue
        seg_item = seg_items.get(tracking_uid)
        if seg is None or seg_item is None:
            raise EncodeError(f"segment '{finding.label}' has voxels but is not in the given SEG")
        referenced_segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=int(seg_item.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        )
        volume = hd.sr.Measurement(
            name=codes.SCT.Volume, value=measurement.volume_cm3, unit=codes.UCUM.CubicCentimeter
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=referenced_segment,
                measurements=[volume],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(_PRESENCE, _PRESENT)],
                **common,
            )
        )

    modality = str(source_datasets[0].get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(identity, model),
        procedure_reported=procedure_code(modality),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    # Evidence: the SEG (the only instance the content references); without one, the source
    # instances that were examined. highdicom copies patient/study identity from the first item.
    evidence: list[Dataset] = [seg] if seg is not None else list(source_datasets)
    evidence[0] = with_type2_identity(evidence[0])
    return comprehensive_sr(evidence, report, identity, model, uids, revision, predecessor)


def comprehensive_sr(
    evidence: list[Dataset],
    report: hd.sr.MeasurementReport,
    identity: OutputIdentity,
    model: ModelIdentity,
    uids: ResultUids,
    revision: int,
    predecessor: Dataset | None,
) -> Dataset:
    """The Comprehensive SR around a TID 1500 report: our identity, series, UIDs and predecessor."""
    try:
        with no_phi_warnings():
            sr = hd.sr.ComprehensiveSR(
                evidence=evidence,
                content=report[0],
                series_instance_uid=uids.sr_series_instance_uid,
                series_number=identity.sr_series_number,
                sop_instance_uid=uids.sr_sop_instance_uid,
                instance_number=1,
                manufacturer=identity.manufacturer,
                manufacturer_model_name=identity.manufacturer_model_name,
                software_versions=identity.software_versions,
                device_serial_number=identity.device_serial_number,
                series_description=series_description(identity.sr_series_description_prefix, model, revision),
                previous_versions=[predecessor] if predecessor is not None else None,
                # Complete, but an unverified AI result: preliminary until a physician signs it off.
                is_complete=True,
                is_final=False,
                is_verified=False,
                institution_name=identity.institution_name or None,
                contributing_equipment=contributing_equipment(identity, model),
            )
    except (ValueError, TypeError, AttributeError) as exc:
        series_uid = evidence[0].get("SeriesInstanceUID", "")
        raise EncodeError(f"cannot encode SR (evidence series {series_uid}): {exc}") from exc
    if identity.station_name:
        sr.StationName = identity.station_name  # Type 3, not a constructor argument
    return sr


def observation_context(identity: OutputIdentity, model: ModelIdentity) -> hd.sr.ObservationContext:
    """TID 1004 device observer: this node running `model` (name = model name, model name = version)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(identity.device_serial_number, model),
            name=model.name,
            manufacturer_name=identity.manufacturer,
            model_name=model.version,
            serial_number=identity.device_serial_number,
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def procedure_code(modality: str) -> Code:
    """CID 100 procedure reported for the source modality (unspecified body region)."""
    default: Code = codes.cid100.ImagingProcedure
    return _PROCEDURE_BY_MODALITY.get(modality, default)


@dataclass(frozen=True)
class _Finding:
    """What one measurement group is about: its label and (where known) its codes."""

    label: str
    category: CodedConcept | None
    property_type: CodedConcept | None
    anatomic_region: CodedConcept | None


def _finding(
    measurement: SegmentMeasurement, segments: Sequence[SegmentSpec] | None, seg_item: Dataset | None
) -> _Finding:
    if segments is not None:
        spec = next((s for s in segments if s.label_value == measurement.label_value), None)
        if spec is None:
            raise EncodeError(f"no segment spec for measured label value {measurement.label_value}")
        return _Finding(spec.label, spec.category, spec.property_type, spec.anatomic_region)
    if seg_item is not None:
        regions = seg_item.get("AnatomicRegionSequence") or []
        return _Finding(
            str(seg_item.SegmentLabel),
            _domain_code(seg_item.SegmentedPropertyCategoryCodeSequence[0]),
            _domain_code(seg_item.SegmentedPropertyTypeCodeSequence[0]),
            _domain_code(regions[0]) if regions else None,
        )
    return _Finding(measurement.label, None, None, None)


def _seg_items_by_tracking_uid(seg: Dataset | None, uids: ResultUids) -> dict[str, Dataset]:
    """TrackingUID -> SegmentSequence item of the SEG (the link between SEG segments and SR groups)."""
    if seg is None:
        return {}
    if seg.SOPInstanceUID != uids.seg_sop_instance_uid:
        raise EncodeError("the SEG passed to encode_sr was not made with these result UIDs")
    return {str(item.TrackingUID): item for item in seg.SegmentSequence if "TrackingUID" in item}


def _domain_code(item: Dataset) -> CodedConcept:
    return CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _optional_code(concept: CodedConcept | None) -> hd.sr.CodedConcept | None:
    return hd_code(concept) if concept is not None else None
