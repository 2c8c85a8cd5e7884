"""End to end against a real Orthanc: storescu -> Orthanc -> (Lua auto-forward) -> node -> SEG + SR -> Orthanc.

Real data: the ch2 T1 brain MR (Debian mricron-data) and the lung1 chest CT (pyradiomics), written as
DICOM series with fresh UIDs. The node runs as its own process (`dicom-ai-node serve`) on SQLite.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicom_ai_node.devtools.datasets import SeriesInfo, ch2_mr_series, lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.stack import orthanc_with_node
from dicom_ai_node.infer.base import SegmentationModel
from dicom_ai_node.infer.registry import default_registry
from dicom_ai_node.infer.volume import load_series

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300


# The default rules send chest CT to the trained CNN (the classical model is its baseline).
CT_MODEL = "ct-lung"


@dataclass
class Outcome:
    source: SeriesInfo
    model: str
    seg_path: Path
    sr_path: Path
    extra: dict[str, object] = field(default_factory=dict)


def _result_files(orthanc: OrthancServer, study_uid: str, dest: Path) -> dict[str, Path] | None:
    found: dict[str, Path] = {}
    for modality in ("SEG", "SR"):
        series = orthanc.series_by_modality(study_uid, modality)
        if not series:
            return None
        instances = series[0]["Instances"]
        if not instances:
            return None
        found[modality] = orthanc.download_instance(instances[0], dest / f"{modality}-{study_uid[-12:]}.dcm")
    return found


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("e2e")
    with orthanc_with_node(work) as (orthanc, node):
        mr = ch2_mr_series(work / "mr")
        ct = lung_ct_series(work / "ct", "lung1")
        ct2 = lung_ct_series(work / "ct2", "lung2")
        sources = (mr, ct, ct2)
        t_sent = time.monotonic()
        storescu([p for info in sources for p in info.paths], orthanc.aet, orthanc.dicom_port)
        results: dict[str, dict[str, Path]] = {}
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and len(results) < len(sources):
            for info in sources:
                if info.study_instance_uid not in results:
                    files = _result_files(orthanc, info.study_instance_uid, work)
                    if files:
                        results[info.study_instance_uid] = files
            time.sleep(1)
        if len(results) < len(sources):
            pytest.fail(
                f"results did not arrive in Orthanc within {TIMEOUT_S} s\nnode log:\n{node.log_tail()}"
            )
        turnaround = time.monotonic() - t_sent
        # Give Orthanc's StableAge time to pass for the results, so a forwarding loop would show.
        time.sleep(4)
        jobs = node.jobs(limit=50)
        node_series = node.get_json("/api/series?limit=100")["items"]
        yield {
            "mr": Outcome(mr, "mr-brain", *_paths(results[mr.study_instance_uid])),
            "ct": Outcome(ct, CT_MODEL, *_paths(results[ct.study_instance_uid])),
            "ct2": Outcome(ct2, CT_MODEL, *_paths(results[ct2.study_instance_uid])),
            "jobs": jobs,
            "node_series": node_series,
            "turnaround_s": turnaround,
            "orthanc": orthanc,
        }


def _paths(files: dict[str, Path]) -> tuple[Path, Path]:
    """(seg_path, sr_path) of an Outcome."""
    return files["SEG"], files["SR"]


def _measurement_report(sr_path: Path) -> hd.sr.MeasurementReport:
    """The TID 1500 content of a stored SR (highdicom decodes it as a MeasurementReport)."""
    content = hd.sr.srread(sr_path).content
    assert isinstance(content, hd.sr.MeasurementReport), type(content)
    return content


@pytest.fixture(scope="module")
def registry():  # type: ignore[no-untyped-def]
    return default_registry("cpu")


@pytest.fixture(scope="module")
def model_masks(e2e, registry):  # type: ignore[no-untyped-def]
    """What the model produces for the source series, computed again here on the same files."""
    masks = {}
    for key in ("mr", "ct"):
        outcome: Outcome = e2e[key]
        volume = load_series(list(outcome.source.paths))
        masks[key] = (volume, registry.get(outcome.model).segment(volume))
    return masks


def _decoded_label_map(seg_path: Path, source: SeriesInfo, model_segments) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The SEG decoded on the source grid as a label map in the model's label values."""
    seg = hd.seg.segread(seg_path)
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(
        list(source.sop_instance_uids), segment_numbers=numbers, assert_missing_frames_are_empty=True
    )
    label_by_name = {s.label: s.label_value for s in model_segments}
    out = np.zeros(pixels.shape[:3], dtype=np.uint8)
    for index, number in enumerate(numbers):
        label = seg.get_segment_description(number).segment_label
        out[pixels[..., index] > 0] = label_by_name[label]
    return out


def test_loop_guard_results_are_not_forwarded_back_to_the_node(e2e) -> None:  # type: ignore[no-untyped-def]
    modalities = sorted(s["modality"] for s in e2e["node_series"])
    assert modalities == ["CT", "CT", "MR"]


@pytest.mark.parametrize("key", ["mr", "ct"])
def test_all_jobs_succeeded(e2e, key: str) -> None:  # type: ignore[no-untyped-def]
    jobs = [
        j
        for j in e2e["jobs"]
        if j["payload"].get("series_instance_uid") == e2e[key].source.series_instance_uid
    ]
    assert {j["kind"] for j in jobs} == {"infer", "deliver"}
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    # Read-back: the node asked Orthanc (C-FIND) and Orthanc holds every object: "delivered, verified".
    [deliver] = [j for j in jobs if j["kind"] == "deliver"]
    assert deliver["result"]["verified"] is True


@pytest.mark.parametrize("key", ["mr", "ct"])
def test_seg_and_sr_land_in_the_source_study_and_reference_the_source_series(e2e, key: str) -> None:  # type: ignore[no-untyped-def]
    outcome: Outcome = e2e[key]
    seg = dcmread(outcome.seg_path)
    sr = dcmread(outcome.sr_path)
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == outcome.source.study_instance_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == outcome.source.series_instance_uid
    assert seg.FrameOfReferenceUID == outcome.source.frame_of_reference_uid
    assert seg.SegmentSequence[0].SegmentAlgorithmName == outcome.model


@pytest.mark.parametrize("key", ["mr", "ct"])
def test_decoded_seg_equals_model_mask_voxel_for_voxel(e2e, model_masks, registry, key: str) -> None:  # type: ignore[no-untyped-def]
    outcome: Outcome = e2e[key]
    volume, label_map = model_masks[key]
    # The volume loader sorts along the slice normal; the data set writer wrote in that same order.
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == list(outcome.source.sop_instance_uids)
    segments = registry.get(outcome.model).segments
    decoded = _decoded_label_map(outcome.seg_path, outcome.source, segments)
    assert label_map.any()
    np.testing.assert_array_equal(decoded, label_map)


@pytest.mark.parametrize("key", ["mr", "ct"])
def test_sr_volumes_match_the_seg_within_one_percent(e2e, key: str) -> None:  # type: ignore[no-untyped-def]
    outcome: Outcome = e2e[key]
    seg = hd.seg.segread(outcome.seg_path)
    source = outcome.source
    voxel_mm3 = source.pixel_spacing[0] * source.pixel_spacing[1] * source.slice_spacing
    pixels = seg.get_pixels_by_source_instance(
        list(source.sop_instance_uids), segment_numbers=seg.get_segment_numbers()
    )
    report = _measurement_report(outcome.sr_path)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(seg.get_segment_numbers())
    for group in groups:
        assert group.referenced_segment is not None  # TID 1411: every group points at its SEG segment
        number = int(group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
        (measurement,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        seg_cm3 = float(pixels[..., seg.get_segment_numbers().index(number)].sum()) * voxel_mm3 / 1000
        assert measurement.value == pytest.approx(seg_cm3, rel=0.01)


@pytest.mark.parametrize("key", ["mr", "ct"])
@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_dciodvfy_reports_no_errors(e2e, key: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    assert shutil.which("dciodvfy"), "dciodvfy (Debian dicom3tools) is required"
    path = getattr(e2e[key], f"{kind}_path")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_deepbet_brain_mask_dice_against_ch2bet(e2e, registry) -> None:  # type: ignore[no-untyped-def]
    outcome: Outcome = e2e["mr"]
    segments = registry.get("mr-brain").segments
    brain = _decoded_label_map(outcome.seg_path, outcome.source, segments) > 0
    reference = outcome.source.reference_mask
    assert reference is not None  # ch2_mr_series always writes ch2bet's mask
    dice = 2 * np.logical_and(brain, reference).sum() / (brain.sum() + reference.sum())
    print(f"deepbet Dice vs ch2bet through the node: {dice:.4f}; turnaround {e2e['turnaround_s']:.1f} s")
    assert dice >= 0.93


def test_ct_lungs_are_both_found_on_the_right_sides(e2e, model_masks, registry) -> None:  # type: ignore[no-untyped-def]
    volume, label_map = model_masks["ct"]
    report = _measurement_report(e2e["ct"].sr_path)
    finding_types = [g.finding_type for g in report.get_volumetric_roi_measurement_groups()]
    assert None not in finding_types
    assert sorted(t.meaning for t in finding_types if t is not None) == ["Left lung", "Right lung"]
    # Patient left is +x in LPS: the left lung's centroid must lie at larger x than the right's.
    xs = {}
    for label in (1, 2):
        k, j, i = np.nonzero(label_map == label)
        centroid = volume.affine_lps @ np.array([i.mean(), j.mean(), k.mean(), 1.0])
        xs[label] = centroid[0]
    segs = {s.label_value: s.label for s in registry.get(CT_MODEL).segments}
    left = next(v for v, name in segs.items() if name == "Left lung")
    right = next(v for v, name in segs.items() if name == "Right lung")
    assert xs[left] > xs[right]


@pytest.mark.parametrize("key", ["ct", "ct2"])
def test_ct_lung_matches_the_reference_masks_through_the_node(e2e, key) -> None:  # type: ignore[no-untyped-def]
    """The issue's bar: Dice >= 0.95 per lung on the real chest CTs, as DICOM through the node, against
    the committed reference masks (checked by eye: docs/images/ct-lung-reference-*.png)."""
    from dicom_ai_node.training.data import load_reference

    outcome: Outcome = e2e[key]
    case = "lung1" if key == "ct" else "lung2"
    model = default_registry("cpu").get(CT_MODEL)
    assert isinstance(model, SegmentationModel)
    segments = model.segments
    decoded = _decoded_label_map(outcome.seg_path, outcome.source, segments)
    reference = load_reference(case)
    assert decoded.shape == reference.shape
    for value, name in ((1, "right lung"), (2, "left lung")):
        a, b = decoded == value, reference == value
        dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        print(f"{case} {name}: Dice {dice:.4f} through the node")
        assert dice >= 0.95, f"{case} {name}: Dice {dice:.4f}"
