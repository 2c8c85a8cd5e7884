"""Classification results (a chest CR classifier's findings) as a TID 1500 SR: finding + probability.

The SR is checked by dciodvfy and by walking its content tree: one group per finding with the finding
code, Present/Absent by threshold, the probability as a numeric measurement, and the threshold and rule
as algorithm parameters.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai_node.devtools.synthetic import write_cr_image
from dicom_ai_node.domain.results import (
    CodedConcept,
    FindingResult,
    FindingSpec,
    ModelIdentity,
    OutputIdentity,
    RuleIdentity,
)
from dicom_ai_node.encode.classification_sr import encode_classification_sr
from dicom_ai_node.encode.uids import result_uids
from dicom_ai_node.errors import EncodeError
from dicom_ai_node.infer.volume import load_series
from tests.support.tools import require_executable

PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")
MODEL = ModelIdentity("cxr-test", "0.1.0")
RULE = RuleIdentity("chest-cr", 3)


def _walk(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(list(item.get("ContentSequence", [])))


def _groups(sr: Dataset) -> list[Dataset]:
    measurement_groups = [
        item
        for item in _walk(list(sr.ContentSequence))
        if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]
    return measurement_groups


def _child(group: Dataset, code: str) -> Dataset:
    child: Dataset = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code)
    return child


@pytest.fixture(scope="module")
def cr_headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    path = write_cr_image(tmp_path_factory.mktemp("cr"), brightness=0.8)
    volume = load_series([path])
    # A CR has no Image Plane module: the loader gives it a nominal one-frame grid.
    assert volume.shape == (1, 256, 256) and volume.modality == "CR"
    return volume.datasets


def test_findings_become_groups_with_presence_and_probability(
    cr_headers: list[Dataset], tmp_path: Path
) -> None:
    findings = [
        FindingResult(FindingSpec(PNEUMOTHORAX, 0.5), 0.83),
        FindingResult(FindingSpec(EFFUSION, 0.3), 0.12),
    ]
    uids = result_uids(str(cr_headers[0].SeriesInstanceUID), MODEL, RULE)
    sr = encode_classification_sr(
        source_datasets=cr_headers,
        findings=findings,
        model=MODEL,
        rule=RULE,
        identity=OutputIdentity(),
        uids=uids,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    sr = dcmread(path)

    assert sr.StudyInstanceUID == cr_headers[0].StudyInstanceUID
    assert sr.SOPInstanceUID == uids.sr_sop_instance_uid
    groups = _groups(sr)
    assert len(groups) == 2
    by_finding = {_child(g, "121071").ConceptCodeSequence[0].CodeValue: g for g in groups}
    assert set(by_finding) == {"36118008", "60046008"}

    ptx = by_finding["36118008"]
    assert _child(ptx, "121052").ConceptCodeSequence[0].CodeMeaning == "Present"
    probability = _child(ptx, "122157").MeasuredValueSequence[0]
    assert float(probability.NumericValue) == pytest.approx(0.83)
    assert probability.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    effusion = by_finding["60046008"]
    assert _child(effusion, "121052").ConceptCodeSequence[0].CodeMeaning == "Absent"
    assert float(_child(effusion, "122157").MeasuredValueSequence[0].NumericValue) == pytest.approx(0.12)

    parameters = [
        str(i.TextValue)
        for i in _walk(list(ptx.ContentSequence))
        if i.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert (
        "threshold=0.5" in parameters and "rule_id=chest-cr" in parameters and "rule_version=3" in parameters
    )
    # The classified image is referenced as the group's source.
    sources = [i for i in ptx.ContentSequence if i.ValueType == "IMAGE"]
    assert sources[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr_headers[0].SOPInstanceUID

    dciodvfy = require_executable("dciodvfy", "apt-get install dicom3tools")
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_same_inputs_give_the_same_sr_uids(cr_headers: list[Dataset]) -> None:
    findings = [FindingResult(FindingSpec(PNEUMOTHORAX), 0.4)]
    uids = result_uids(str(cr_headers[0].SeriesInstanceUID), MODEL, RULE)
    first = encode_classification_sr(
        source_datasets=cr_headers,
        findings=findings,
        model=MODEL,
        rule=RULE,
        identity=OutputIdentity(),
        uids=uids,
    )
    second = encode_classification_sr(
        source_datasets=cr_headers,
        findings=findings,
        model=MODEL,
        rule=RULE,
        identity=OutputIdentity(),
        uids=uids,
    )
    assert first.SOPInstanceUID == second.SOPInstanceUID
    tracking = [
        [str(i.UID) for i in _walk(list(sr.ContentSequence)) if i.ValueType == "UIDREF"]
        for sr in (first, second)
    ]
    assert tracking[0] and tracking[0] == tracking[1]


def test_bad_probability_and_no_findings_are_refused(cr_headers: list[Dataset]) -> None:
    uids = result_uids(str(cr_headers[0].SeriesInstanceUID), MODEL, RULE)
    with pytest.raises(EncodeError, match="outside 0..1"):
        encode_classification_sr(
            source_datasets=cr_headers,
            findings=[FindingResult(FindingSpec(PNEUMOTHORAX), 1.5)],
            model=MODEL,
            rule=RULE,
            identity=OutputIdentity(),
            uids=uids,
        )
    with pytest.raises(EncodeError, match="no findings"):
        encode_classification_sr(
            source_datasets=cr_headers,
            findings=[],
            model=MODEL,
            rule=RULE,
            identity=OutputIdentity(),
            uids=uids,
        )
