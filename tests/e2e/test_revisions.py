"""Results in the PACS over time, against a real Orthanc:

- a re-run of the same input gives the same UIDs: still one SEG and one SR in the study;
- a late image after the results were sent gives a new revision (new series, 'rev 2'), whose SR names
  the SR it supersedes (Predecessor Documents Sequence); the first results stay untouched.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_ai_node.devtools.datasets import lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.orthanc import OrthancServer, wait_for
from dicom_ai_node.devtools.stack import orthanc_with_node

pytestmark = pytest.mark.e2e


def _results(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs of the SEG and SR instances in the study, per modality."""
    out: dict[str, list[str]] = {}
    for modality in ("SEG", "SR"):
        uids = []
        for series in orthanc.series_by_modality(study_uid, modality):
            for instance in series["Instances"]:
                uids.append(orthanc.get_json(f"/instances/{instance}/simplified-tags")["SOPInstanceUID"])
        out[modality] = sorted(uids)
    return out


def _download(orthanc: OrthancServer, study_uid: str, modality: str, dest: Path) -> list[Path]:
    paths = []
    for series in orthanc.series_by_modality(study_uid, modality):
        for instance in series["Instances"]:
            paths.append(orthanc.download_instance(instance, dest / f"{instance}.dcm"))
    return paths


def _late_slice(paths: list[Path], slice_spacing: float, dest: Path) -> Path:
    """One more slice past the last one: new SOP Instance UID, position one slice step further."""
    ds = dcmread(paths[-1])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + normal * slice_spacing
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.InstanceNumber = int(ds.InstanceNumber) + 1
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_rerun_is_idempotent_and_late_images_make_a_revision(tmp_path: Path) -> None:
    with orthanc_with_node(tmp_path) as (orthanc, node):
        ct = lung_ct_series(tmp_path / "ct", "lung1")
        study = ct.study_instance_uid
        storescu(list(ct.paths), orthanc.aet, orthanc.dicom_port)

        def one_each() -> dict[str, list[str]] | None:
            found = _results(orthanc, study)
            return found if len(found["SEG"]) == 1 and len(found["SR"]) == 1 else None

        first = wait_for(one_each, 180, what="the first SEG + SR in Orthanc")

        # 1. Re-run the finished infer job: same UIDs, so Orthanc still holds one SEG and one SR.
        [infer] = [j for j in node.jobs() if j["kind"] == "infer"]
        node.post_json(f"/api/jobs/{infer['id']}/rerun")

        def rerun_done() -> bool:
            jobs = node.jobs()
            return len(jobs) == 4 and all(j["status"] == "succeeded" for j in jobs)

        wait_for(rerun_done, 120, what="the re-run and its delivery")
        time.sleep(1)
        assert _results(orthanc, study) == first

        # 2. A late image: Orthanc re-forwards the series, the node makes revision 2.
        late = _late_slice(list(ct.paths), ct.slice_spacing, tmp_path / "late.dcm")
        storescu([late], orthanc.aet, orthanc.dicom_port)

        def two_each() -> dict[str, list[str]] | None:
            found = _results(orthanc, study)
            return found if len(found["SEG"]) == 2 and len(found["SR"]) == 2 else None

        second = wait_for(two_each, 180, what="the revision-2 SEG + SR in Orthanc")
        assert set(first["SEG"]) < set(second["SEG"]) and set(first["SR"]) < set(second["SR"])
        series = node.get_json(f"/api/series/{ct.series_instance_uid}")
        assert series["generation"] == 2 and series["instance_count"] == len(ct.paths) + 1

        srs = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, _download(orthanc, study, "SR", tmp_path))}
        [new_sr_uid] = set(second["SR"]) - set(first["SR"])
        new_sr = srs[new_sr_uid]
        assert new_sr.SeriesDescription.endswith("rev 2")
        predecessors = [
            sop.ReferencedSOPInstanceUID
            for study_item in new_sr.PredecessorDocumentsSequence
            for series_item in study_item.ReferencedSeriesSequence
            for sop in series_item.ReferencedSOPSequence
        ]
        assert predecessors == first["SR"]
        assert "PredecessorDocumentsSequence" not in srs[first["SR"][0]]  # the first one is untouched

        segs = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, _download(orthanc, study, "SEG", tmp_path))}
        [new_seg_uid] = set(second["SEG"]) - set(first["SEG"])
        assert segs[new_seg_uid].SeriesDescription.endswith("rev 2")
        referenced = {
            ref.ReferencedSOPInstanceUID
            for item in segs[new_seg_uid].ReferencedSeriesSequence
            for ref in item.ReferencedInstanceSequence
        }
        assert str(dcmread(late, stop_before_pixels=True).SOPInstanceUID) in referenced
        new_sr.save_as(tmp_path / "new-sr.dcm")
        proc = subprocess.run(["dciodvfy", str(tmp_path / "new-sr.dcm")], capture_output=True, text=True)
        assert [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")] == []
