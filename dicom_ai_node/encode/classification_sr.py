"""TID 1500 Measurement Report for a classification result: one finding + probability per group.

A classifier (e.g. a chest CR/DX model) reports findings, not regions, so there is no SEG. Each finding
the model scores becomes a TID 1501 Measurements and Qualitative Evaluations group:
- Tracking Identifier = the finding's meaning, Tracking UID deterministic per (result, finding);
- Finding Type = the finding's code (e.g. SCT 36118008 Pneumothorax), Finding Category "Finding";
- Qualitative Evaluation "Presence of property" = Present / Absent, from probability >= threshold;
- Measurement "Probability" (DCM 122157) in UCUM "1" (no units, 0..1), the model's raw score;
- TID 4019 Algorithm Identification with the model name/version and the rule id/version plus the
  threshold as Algorithm Parameters, so a reader can tell how Present/Absent was decided;
- Source images for the measurement group: the classified instances.
Absent findings are reported too: "the model looked and found nothing" is a result, silence is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai_node.domain.results import (
    FindingResult,
    ModelIdentity,
    OutputIdentity,
    ResultUids,
    RuleIdentity,
)
from dicom_ai_node.encode._common import (
    hd_code,
    rule_parameters,
    with_type2_identity,
)
from dicom_ai_node.encode.sr import comprehensive_sr, observation_context, procedure_code
from dicom_ai_node.encode.uids import deterministic_uid
from dicom_ai_node.errors import EncodeError

PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_FINDING_CATEGORY = hd.sr.CodedConcept("404684003", "SCT", "Clinical finding")


def finding_tracking_uid(uids: ResultUids, finding_code: str) -> str:
    """Tracking UID of one finding's group: stable across re-runs of the same result."""
    return deterministic_uid("finding", uids.sr_sop_instance_uid, finding_code)


def encode_classification_sr(
    *,
    source_datasets: Sequence[Dataset],
    findings: Sequence[FindingResult],
    model: ModelIdentity,
    rule: RuleIdentity,
    identity: OutputIdentity,
    uids: ResultUids,
    revision: int = 1,
    predecessor: Dataset | None = None,
) -> Dataset:
    """Encode a classifier's findings as a Comprehensive SR (TID 1500) in the source study."""
    if not source_datasets:
        raise EncodeError("no source datasets")
    if not findings:
        raise EncodeError("no findings: a classification report needs at least one")
    source_images = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        )
        for ds in source_datasets
    ]
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for result in findings:
        finding = result.spec.finding
        if not 0.0 <= result.probability <= 1.0:
            raise EncodeError(f"finding {finding.meaning}: probability {result.probability} outside 0..1")
        algorithm = hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[
                *(f"{key}={value}" for key, value in rule_parameters(rule).items()),
                f"threshold={result.spec.threshold:g}",
            ],
            family=hd_code(model.family),
        )
        presence = hd.sr.QualitativeEvaluation(
            codes.DCM.PresenceOfProperty, codes.SCT.Present if result.present else codes.SCT.Absent
        )
        probability = hd.sr.Measurement(
            name=PROBABILITY,
            value=round(result.probability, 6),
            unit=codes.UCUM.NoUnits,
            algorithm_id=algorithm,
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=finding_tracking_uid(uids, finding.value), identifier=finding.meaning
                ),
                finding_type=hd_code(finding),
                finding_category=_FINDING_CATEGORY,
                algorithm_id=algorithm,
                measurements=[probability],
                qualitative_evaluations=[presence],
                source_images=source_images,
            )
        )
    modality = str(source_datasets[0].get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(identity, model),
        procedure_reported=procedure_code(modality),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    evidence = list(source_datasets)
    evidence[0] = with_type2_identity(evidence[0])
    return comprehensive_sr(evidence, report, identity, model, uids, revision, predecessor)
