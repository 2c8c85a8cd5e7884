"""`evaluate` end to end on small datasets built here: DICOM + reference SEG, NIfTI/NRRD pairs, and a
TorchScript classifier with labels.csv; the numbers in evaluation.json are checked against values
known by construction, and the reports and PNGs against being real files with real content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image
import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
import typer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from typer.testing import CliRunner

from dicom_ai_node.devtools.synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_ct_series
from dicom_ai_node.domain.results import OutputIdentity, RuleIdentity, SegmentSpec
from dicom_ai_node.encode import encode_seg, result_uids
from dicom_ai_node.encode.seg import SegFormat
from dicom_ai_node.evaluate.cli import evaluate_command
from dicom_ai_node.evaluate.reference import DatasetError, seg_reference
from dicom_ai_node.evaluate.run import evaluate
from dicom_ai_node.infer.base import SegmentationModel
from dicom_ai_node.infer.manifest import load_manifest, sha256_of
from dicom_ai_node.infer.registry import ModelRegistry, build_model, default_registry
from dicom_ai_node.infer.volume import Volume, load_series, to_nifti_ras

LUNG_MODEL = "ct-lung-classical"
RIGHT, LEFT = 1, 2


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return default_registry("cpu")


def _ct(directory: Path) -> Volume:
    # 6 mm pixels, 10 mm slices: the phantom's lungs are lung-sized (about 1 L each), which the
    # classical model needs, on a 64 x 64 x 12 grid that it segments in milliseconds.
    return load_series(
        write_ct_series(directory, n_slices=12, pixel_spacing=(6.0, 6.0), slice_thickness=10.0)
    )


def _phantom_labels(volume: Volume) -> np.ndarray:
    """The phantom's lungs (-850 HU) split at the midline: columns run towards the patient's left."""
    lung = (volume.array > -900) & (volume.array < -800)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    left_half = np.arange(volume.shape[2])[None, None, :] >= volume.shape[2] // 2
    labels[lung & ~left_half] = RIGHT
    labels[lung & left_half] = LEFT
    return labels


def _write_seg(volume: Volume, labels: np.ndarray, segments: list[SegmentSpec], path: Path) -> None:
    model = default_registry("cpu").get(LUNG_MODEL).identity  # the SEG's author: any identity will do
    rule = RuleIdentity("reference", 1)
    uids = result_uids(volume.series_instance_uid, model, rule, 1)
    seg = encode_seg(
        source_datasets=volume.datasets,
        label_map=labels,
        segments=segments,
        model=model,
        rule=rule,
        identity=OutputIdentity(),
        uids=uids,
    )
    assert seg is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


def _assert_report(out: Path, results: dict[str, Any], *, pngs: int) -> str:
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk == results
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    assert len(html) > 3000 and len(markdown) > 1500
    for text in (html, markdown, json.dumps(results)):
        assert FAKE_PATIENT_NAME not in text and FAKE_PATIENT_ID not in text and "19000101" not in text
    images = sorted(out.rglob("*.png"))
    assert len(images) == pngs
    for png in images:
        pixels = matplotlib.image.imread(png)
        assert min(pixels.shape[:2]) > 200 and float(pixels[..., :3].std()) > 0.01, png  # drawn, not blank
        assert png.relative_to(out).as_posix() in html and png.relative_to(out).as_posix() in markdown
    return html


def test_dicom_cases_with_reference_seg(tmp_path: Path, registry: ModelRegistry) -> None:
    lung_model = registry.get(LUNG_MODEL)
    assert isinstance(lung_model, SegmentationModel)
    data = tmp_path / "dataset"

    # a: the reference is exactly what the model finds.
    volume_a = _ct(data / "case-a" / "series")
    _write_seg(
        volume_a, _phantom_labels(volume_a), lung_model.segments, data / "case-a" / "reference" / "seg.dcm"
    )

    # b: segments in another order, under other labels (matched by SNOMED code), and the right lung's
    # top frame left out of the reference.
    volume_b = _ct(data / "case-b" / "series")
    labels_b = _phantom_labels(volume_b)
    top = int(np.flatnonzero((labels_b == RIGHT).any(axis=(1, 2)))[-1])
    expected_right = labels_b == RIGHT
    reference_right = expected_right.copy()
    reference_right[top] = False
    swapped = np.zeros_like(labels_b)
    swapped[labels_b == LEFT] = 1
    swapped[reference_right] = 2
    right_spec, left_spec = lung_model.segments
    renamed = [
        SegmentSpec(1, "Lung, left", left_spec.category, left_spec.property_type, (0, 255, 0)),
        SegmentSpec(2, "Lung, right", right_spec.category, right_spec.property_type, (0, 0, 255)),
    ]
    _write_seg(volume_b, swapped, renamed, data / "case-b" / "reference" / "seg.dcm")

    # c: a reference without the left lung (SEG next to the series, not in reference/).
    volume_c = _ct(data / "case-c" / "series")
    labels_c = _phantom_labels(volume_c)
    labels_c[labels_c == LEFT] = 0
    _write_seg(volume_c, labels_c, lung_model.segments, data / "case-c" / "ref-seg.dcm")
    (data / "case-c" / "README.txt").write_text("not DICOM: ignored")

    # d: no reference at all: recorded as failed, the others still count.
    _ct(data / "case-d")

    out = tmp_path / "out"
    results = evaluate(LUNG_MODEL, data, out, registry, "cpu", progress=False)

    assert results["dataset"]["layout"] == "dicom"
    assert (
        results["dataset"]["n_cases"],
        results["dataset"]["n_evaluated"],
        results["dataset"]["n_failed"],
    ) == (4, 3, 1)
    cases = {c["case"]: c for c in results["cases"]}
    assert cases["case-d"]["status"] == "failed" and "no reference DICOM SEG" in cases["case-d"]["error"]
    assert cases["case-a"]["series_uid"] == volume_a.series_instance_uid
    scores = {name: {s["label"]: s for s in c["labels"]} for name, c in cases.items() if c["status"] == "ok"}

    for label in ("Right lung", "Left lung"):
        a = scores["case-a"][label]
        assert (a["dice"], a["hd95_mm"], a["volume_error_cm3"], a["volume_error_pct"]) == (1.0, 0.0, 0.0, 0.0)

    voxel_cm3 = 6.0 * 6.0 * 10.0 / 1000
    b = scores["case-b"]["Right lung"]
    n_ref, n_pred = int(reference_right.sum()), int(expected_right.sum())
    assert b["dice"] == pytest.approx(2 * n_ref / (n_ref + n_pred))
    # The model's extra top frame lies one slice (10 mm, not 1 voxel or 6 mm) above the reference.
    assert 0.0 < b["hd95_mm"] <= 10.0 + 1e-9
    assert b["volume_error_cm3"] == pytest.approx((n_pred - n_ref) * voxel_cm3)
    assert b["volume_error_pct"] == pytest.approx(100 * (n_pred - n_ref) / n_ref)
    assert scores["case-b"]["Left lung"]["dice"] == 1.0

    c = scores["case-c"]["Left lung"]
    assert (
        c["dice"] == 0.0 and c["hd95_mm"] is None and c["volume_error_pct"] is None and c["reference_empty"]
    )

    summary = {s["label"]: s for s in results["labels"]}
    left = summary["Left lung"]
    assert left["n_cases"] == 3 and left["n_false_alarm"] == 1 and left["n_missed"] == 0
    assert left["dice"]["mean"] == pytest.approx(2 / 3) and left["dice"]["min"] == 0.0
    assert left["dice"]["median"] == 1.0
    assert left["hd95_mm"]["n_undefined"] == 1 and left["hd95_mm"]["n"] == 2
    assert summary["Right lung"]["dice"]["mean"] == pytest.approx((2 + b["dice"]) / 3)

    model = results["model"]
    assert (model["name"], model["version"], model["weights"]) == (LUNG_MODEL, "1.0.0", [])
    assert model["licence"].startswith("Apache-2.0") and "Not a diagnostic device" in model["intended_use"]
    assert any("HD95 undefined in 1 case" in limit for limit in results["limits"])
    html = _assert_report(out, results, pngs=3 + 3)  # dice, hd95, volumes + one overlay per evaluated case
    assert "Right lung" in html and "no reference DICOM SEG" in html


def test_nifti_and_nrrd_pairs(tmp_path: Path, registry: ModelRegistry) -> None:
    data = tmp_path / "pairs"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "dataset.yaml").write_text(
        "name: Phantom pairs\nmodality: CT\nsegments:\n  5: Right lung\n  7: 2\n  9: null\n"
    )
    volume = _ct(tmp_path / "dicom")
    labels = _phantom_labels(volume)
    coded = np.where(labels == RIGHT, 5, np.where(labels == LEFT, 7, 0)).astype(np.uint8)
    coded[0, 0, 0] = 9  # a reference label dataset.yaml says to ignore

    # n1: the image with its frame axis reversed (a left-handed NIfTI grid, which the loader flips
    # back), the label with its in-plane axes swapped: resampled onto the image by patient position.
    image = to_nifti_ras(volume)
    flipped = np.ascontiguousarray(np.asarray(image.dataobj)[:, :, ::-1])
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (volume.shape[0] - 1)
    affine[:3, 2] *= -1
    nib.save(nib.Nifti1Image(flipped, affine), data / "images" / "n1.nii.gz")
    swapped = np.ascontiguousarray(coded.transpose(1, 2, 0))  # NIfTI axes (row, col, frame)
    nib.save(nib.Nifti1Image(swapped, image.affine[:, [1, 0, 2, 3]]), data / "labels" / "n1.nii.gz")

    # n2: NRRD in LPS space; the reference left lung is shifted one column (6 mm) towards the left.
    header = {
        "space": "left-posterior-superior",
        "space directions": volume.affine_lps[:3, :3].T,
        "space origin": volume.affine_lps[:3, 3],
    }
    nrrd.write(str(data / "images" / "n2.nrrd"), volume.array.transpose(2, 1, 0), header)
    shifted = coded.copy()
    shifted[shifted == 7] = 0
    shifted[:, :, 1:][coded[:, :, :-1] == 7] = 7
    nrrd.write(str(data / "labels" / "n2.nrrd"), shifted.transpose(2, 1, 0), header)

    out = tmp_path / "out"
    results = evaluate(LUNG_MODEL, data, out, registry, "cpu", progress=False)

    assert results["dataset"]["layout"] == "image-pairs" and results["dataset"]["name"] == "Phantom pairs"
    assert results["dataset"]["n_evaluated"] == 2 and results["dataset"]["modalities"] == ["CT"]
    assert all(c["series_uid"] is None for c in results["cases"])  # no DICOM series behind NIfTI/NRRD
    cases = {c["case"]: {s["label"]: s for s in c["labels"]} for c in results["cases"]}
    for label in ("Right lung", "Left lung"):
        assert cases["n1"][label]["dice"] == 1.0 and cases["n1"][label]["hd95_mm"] == 0.0
    notes = next(c["notes"] for c in results["cases"] if c["case"] == "n1")
    assert any("resampled" in n for n in notes) and not any("value 9" in n for n in notes)

    left = labels == LEFT
    moved = shifted == 7
    expected = 2 * int((left & moved).sum()) / int(left.sum() + moved.sum())
    assert cases["n2"]["Left lung"]["dice"] == pytest.approx(expected) and expected < 1.0
    assert cases["n2"]["Left lung"]["hd95_mm"] == pytest.approx(6.0)
    assert cases["n2"]["Left lung"]["volume_error_cm3"] == pytest.approx(0.0)
    assert cases["n2"]["Right lung"]["dice"] == 1.0
    _assert_report(out, results, pngs=3 + 2)


class _MeanIntensity(torch.nn.Module):
    """Probability = sigmoid(10 (mean - 0.5)) of the prepared image: known answers for constant images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((x.mean(dim=(1, 2, 3)) - 0.5) * 10.0)[:, None]


def _classifier(directory: Path) -> ModelRegistry:
    directory.mkdir()
    torch.jit.script(_MeanIntensity()).save(str(directory / "model.ts"))
    (directory / "manifest.yaml").write_text(
        f"""name: tiny-ptx
version: "0.1"
task: classification
format: torchscript
description: mean-intensity test classifier
accepts: {{modalities: [OT, CT]}}
input: {{orientation: native, size: [64, 64], intensity: {{window: [0, 100], normalise: minmax}}}}
outputs:
  activation: none
  findings: [{{index: 0, finding: {{value: "36118008", scheme: SCT, meaning: Pneumothorax}}}}]
weights: [{{file: model.ts, sha256: {sha256_of(directory / "model.ts")}}}]
licence: test only
training_data: none
intended_use: tests
"""
    )
    manifest = load_manifest(directory)
    registry = ModelRegistry()
    registry.register(manifest.name, lambda: build_model(manifest, "cpu"), manifest)
    return registry


def _image(path: Path, value: int, *, series_uid: str, frame: int | None = None) -> None:
    """A constant 32 x 32 image: a secondary capture without patient geometry, or (frame given) one
    CT slice of an axial series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = SecondaryCaptureImageStorage if frame is None else CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = FAKE_PATIENT_NAME, FAKE_PATIENT_ID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid
    ds.Modality = "OT" if frame is None else "CT"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frame is not None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 5.0 * frame]
        ds.PixelSpacing = [1.0, 1.0]
        ds.InstanceNumber = frame + 1
    ds.PixelData = np.full((32, 32), value, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_classification_with_labels_csv(tmp_path: Path) -> None:
    registry = _classifier(tmp_path / "model")
    data = tmp_path / "cls"
    _image(data / "c1.dcm", 10, series_uid=generate_uid())
    _image(data / "images" / "c2.dcm", 40, series_uid=generate_uid())
    series = generate_uid()
    for k in range(3):
        _image(data / "c3" / f"{k}.dcm", 40, series_uid=series, frame=k)
    nib.save(nib.Nifti1Image(np.full((32, 32, 1), 60, np.float32), np.eye(4)), data / "images" / "c4.nii.gz")
    _image(data / "c5", 90, series_uid=generate_uid())
    _image(data / "unlabelled.dcm", 50, series_uid=generate_uid())
    (data / "labels.csv").write_text(
        "case,finding,label\nc1,Pneumothorax,0\nc2,Pneumothorax,0\nc3,Pneumothorax,1\nc4,pneumothorax,1\n"
        "c5,Pneumothorax,0\nc5,Effusion,1\n"
    )

    out = tmp_path / "out"
    results = evaluate("tiny-ptx", data, out, registry, "cpu", progress=False)

    assert results["dataset"]["n_evaluated"] == 5, results["cases"]
    probabilities = {c["case"]: c["findings"][0]["probability"] for c in results["cases"]}
    expected = {"c1": 0.1, "c2": 0.4, "c3": 0.4, "c4": 0.6, "c5": 0.9}
    for case, mean in expected.items():
        assert probabilities[case] == pytest.approx(1 / (1 + np.exp(-10 * (mean - 0.5))), abs=1e-5)
    (finding,) = results["findings"]
    assert (finding["tp"], finding["fp"], finding["tn"], finding["fn"]) == (1, 1, 2, 1)
    assert finding["accuracy"]["value"] == pytest.approx(0.6)
    assert finding["precision"]["value"] == 0.5 and finding["recall"]["value"] == 0.5
    assert finding["specificity"]["value"] == pytest.approx(2 / 3)
    # Positives 0.27 (tied with a negative) and 0.73 against negatives 0.02, 0.27, 0.98: 3.5 of 6 pairs.
    assert finding["auc"]["value"] == pytest.approx(3.5 / 6)
    assert finding["roc"]["thresholds"][0] is None and finding["roc"]["fpr"][-1] == 1.0
    lo, hi = finding["accuracy"]["ci95"]
    assert lo < 0.6 < hi
    assert results["model"]["weights"][0]["verified"] is True
    assert any("Effusion" in w for w in results["dataset"]["warnings"])
    assert any("without a row" in w for w in results["dataset"]["warnings"])
    _assert_report(out, results, pngs=2)  # roc + score strips


def test_cli_exit_codes(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("noop")(lambda: None)  # two commands: the first argument names the command
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    unknown = runner.invoke(app, ["evaluate", "no-such-model", str(tmp_path / "empty")])
    assert unknown.exit_code == 2 and "no cases found" in unknown.output
    data = tmp_path / "d"
    (data / "case-1").mkdir(parents=True)
    unknown = runner.invoke(app, ["evaluate", "no-such-model", str(data), "-o", str(tmp_path / "o")])
    assert unknown.exit_code == 2 and "no model named 'no-such-model'" in unknown.output
    missing = runner.invoke(app, ["evaluate", LUNG_MODEL, str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a folder" in missing.output
    (data / "labels.csv").write_text("case,finding,label\ncase-1,Lung,maybe\n")
    malformed = runner.invoke(app, ["evaluate", LUNG_MODEL, str(data)])
    assert malformed.exit_code == 2 and "labels.csv:2" in malformed.output
    (data / "labels.csv").unlink()
    # A dataset whose only case has no reference: the report is written, but nothing was evaluated.
    nothing = runner.invoke(app, ["evaluate", LUNG_MODEL, str(data), "-o", str(tmp_path / "o")])
    assert nothing.exit_code == 1 and "no case could be evaluated" in nothing.output
    assert (tmp_path / "o" / "evaluation.json").is_file()


def test_task_mismatch_is_a_dataset_error(tmp_path: Path, registry: ModelRegistry) -> None:
    data = tmp_path / "cls"
    _image(data / "c1.dcm", 10, series_uid=generate_uid())
    (data / "labels.csv").write_text("case,Pneumothorax\nc1,1\n")
    with pytest.raises(DatasetError, match="classification dataset"):
        evaluate(LUNG_MODEL, data, tmp_path / "out", registry, "cpu", progress=False)


@pytest.mark.parametrize("seg_format", ["fractional", "labelmap"])
def test_seg_on_other_instances_is_mapped_by_patient_position(
    tmp_path: Path, registry: ModelRegistry, seg_format: SegFormat
) -> None:
    # A reference drawn on another export of the same acquisition (same frame of reference, other
    # SOP instances), stored as FRACTIONAL or LABELMAP: read by geometry, voxel for voxel.
    lung_model = registry.get(LUNG_MODEL)
    assert isinstance(lung_model, SegmentationModel)
    frame_of_reference = generate_uid()

    def export(directory: Path) -> list[Path]:  # one acquisition's geometry, fresh SOP instances
        return write_ct_series(
            directory,
            n_slices=12,
            pixel_spacing=(6.0, 6.0),
            slice_thickness=10.0,
            frame_of_reference_uid=frame_of_reference,
        )

    drawn_on = load_series(export(tmp_path / "a"))
    evaluated = load_series(export(tmp_path / "b"))
    labels = _phantom_labels(drawn_on)
    rule = RuleIdentity("reference", 1)
    uids = result_uids(drawn_on.series_instance_uid, lung_model.identity, rule, 1)
    seg = encode_seg(
        source_datasets=drawn_on.datasets,
        label_map=labels,
        segments=lung_model.segments,
        model=lung_model.identity,
        rule=rule,
        identity=OutputIdentity(),
        uids=uids,
        seg_format=seg_format,
    )
    assert seg is not None
    seg.save_as(tmp_path / "seg.dcm")
    reference = seg_reference(tmp_path / "seg.dcm", evaluated, lung_model.segments, {})
    assert np.array_equal(reference.masks[RIGHT], labels == RIGHT)
    assert np.array_equal(reference.masks[LEFT], labels == LEFT)
    assert reference.notes == ["the SEG references other instances: mapped by patient coordinates"]
