"""Classification end to end against a real Orthanc: a chest CR goes through the node to a user
TorchScript classifier (models.paths), and an SR with the findings + probabilities comes back into the
same study (no SEG: a classifier has no region)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.orthanc import OrthancServer, wait_for
from dicom_ai_node.devtools.stack import orthanc_with_node
from dicom_ai_node.devtools.synthetic import write_cr_image
from dicom_ai_node.infer.volume import load_series
from tests.support.classifier import MODEL_NAME, expected_probability, write_torchscript_classifier

pytestmark = pytest.mark.e2e


def _items(items: list[Dataset]) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        out.extend(_items(list(item.get("ContentSequence", []))))
    return out


def test_chest_cr_gets_a_classification_sr(tmp_path: Path) -> None:
    write_torchscript_classifier(tmp_path / "models")
    rules = {
        "rules": [
            {
                "id": "chest-radiograph",
                "version": 2,
                "conditions": [
                    {"attribute": "Modality", "in": ["CR", "DX"]},
                    {"attribute": "BodyPartExamined", "equals": "CHEST"},
                ],
                "action": {"model": MODEL_NAME, "destinations": ["pacs"], "quiet_period_s": 1},
            }
        ]
    }
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))

    def node_config(_: OrthancServer) -> dict[str, object]:
        return {
            "rules_file": str(rules_file),
            "models": {"device": "auto", "paths": [str(tmp_path / "models")]},
        }

    cr_path = write_cr_image(tmp_path / "cr", brightness=0.9)
    volume = load_series([cr_path])
    mean = float(np.clip(volume.array / 4095.0, 0, 1).mean())
    with orthanc_with_node(tmp_path, node_extra=node_config) as (orthanc, node):
        storescu([cr_path], orthanc.aet, orthanc.dicom_port)

        def delivered() -> dict[str, Any] | None:
            jobs = [j for j in node.jobs() if j["kind"] == "deliver"]
            return jobs[0] if jobs and jobs[0]["status"] in ("succeeded", "dead") else None

        job = wait_for(delivered, 120, what="the SR delivery")
        assert job["status"] == "succeeded", job["last_error"]
        assert job["result"]["verified"] is True
        infer = next(j for j in node.jobs() if j["kind"] == "infer")
        assert infer["result"]["task"] == "classification"

        study = str(volume.datasets[0].StudyInstanceUID)
        assert orthanc.series_by_modality(study, "SEG") == []
        sr_series = orthanc.series_by_modality(study, "SR")
        assert len(sr_series) == 1
        sr = dcmread(orthanc.download_instance(sr_series[0]["Instances"][0], tmp_path / "sr.dcm"))

    assert sr.StudyInstanceUID == study
    items = _items(list(sr.ContentSequence))
    probabilities = [float(i.MeasuredValueSequence[0].NumericValue) for i in items if i.ValueType == "NUM"]
    # The 64x64 resize averages the image, so the mean is the source mean to within rounding.
    p = expected_probability(mean)
    assert probabilities == pytest.approx([p, 1 - p], abs=0.02)
    presence = [
        i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121052"
    ]
    assert presence == ["Present", "Absent"]  # p > 0.5 for the first finding; 1 - p < 0.7 for the second
    algorithm_names = {str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "111001"}
    assert algorithm_names == {MODEL_NAME}
    parameters = {str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "111002"}
    assert {"rule_id=chest-radiograph", "rule_version=2", "threshold=0.5", "threshold=0.7"} <= parameters
