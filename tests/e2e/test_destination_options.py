"""Per-destination SEG options against a real Orthanc (1.10, which predates the LABELMAP SOP class):

- a DIMSE destination asking for LABELMAP: Orthanc refuses the SOP class, the node falls back to the
  plain BINARY SEG (every frame) and its SR, and verifies them;
- a DICOMweb destination asking for LABELMAP and key images: STOW-RS stores the LABELMAP SEG (RLE) and
  Secondary Capture key images with the overlay burned in (marked derived), verified by QIDO-RS.
Both SEGs decode to the same mask on the source grid.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import yaml
from pydicom import dcmread

from dicom_ai_node.devtools.datasets import lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.orthanc import OrthancServer, wait_for
from dicom_ai_node.devtools.repo import ROOT
from dicom_ai_node.devtools.stack import orthanc_with_node

pytestmark = pytest.mark.e2e

LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
BINARY_SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def test_labelmap_opt_in_and_fallback_to_plain_binary(tmp_path: Path) -> None:
    rules = yaml.safe_load((ROOT / "config" / "rules.yaml").read_text())
    for rule in rules["rules"]:
        rule["action"]["destinations"] = ["pacs-labelmap", "web-labelmap"]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))

    def node_config(orthanc: OrthancServer) -> dict[str, object]:
        destinations = [
            {
                "name": "pacs-labelmap",
                "type": "dicom",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "seg_format": "labelmap",
            },
            {
                "name": "web-labelmap",
                "type": "dicomweb",
                "url": orthanc.dicomweb_url,
                "seg_format": "labelmap",
                "key_images": True,
            },
        ]
        return {"rules_file": str(rules_file), "destinations": destinations}

    with orthanc_with_node(tmp_path, node_extra=node_config) as (orthanc, node):
        ct = lung_ct_series(tmp_path / "ct", "lung1")
        storescu(list(ct.paths), orthanc.aet, orthanc.dicom_port)

        def delivered() -> list[dict[str, Any]] | None:
            jobs = [j for j in node.jobs() if j["kind"] == "deliver"]
            done = len(jobs) == 2 and all(j["status"] in ("succeeded", "dead") for j in jobs)
            return jobs if done else None

        jobs = {j["payload"]["destination"]: j for j in wait_for(delivered, 180, what="both deliveries")}
        for job in jobs.values():
            assert job["status"] == "succeeded", job["last_error"]
            assert job["result"]["verified"] is True
        assert jobs["pacs-labelmap"]["result"]["fallback"] is True
        assert jobs["web-labelmap"]["result"]["fallback"] is False
        time.sleep(1)

        segs = []
        for series in orthanc.series_by_modality(ct.study_instance_uid, "SEG"):
            for instance in series["Instances"]:
                segs.append(dcmread(orthanc.download_instance(instance, tmp_path / f"{instance}.dcm")))
        by_class = {str(ds.SOPClassUID): ds for ds in segs}
        assert sorted(by_class) == sorted([LABELMAP_SEG, BINARY_SEG]), sorted(by_class)
        labelmap, binary = by_class[LABELMAP_SEG], by_class[BINARY_SEG]
        assert labelmap.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE Lossless
        # The fallback is the plain form: a frame for every source image and segment.
        assert int(binary.NumberOfFrames) == len(ct.paths) * len(binary.SegmentSequence)
        assert len(orthanc.series_by_modality(ct.study_instance_uid, "SR")) == 2

        sources = list(ct.sop_instance_uids)
        masks = []
        for ds in (labelmap, binary):
            seg = hd.seg.Segmentation.from_dataset(ds)
            masks.append(seg.get_pixels_by_source_instance(sources, combine_segments=True))
        assert masks[0].any() and np.array_equal(masks[0], masks[1])

        # Key images: derived RGB Secondary Capture, overlay colour exactly where the mask is.
        key_series = orthanc.series_by_modality(ct.study_instance_uid, "OT")
        assert len(key_series) == 1 and 1 <= len(key_series[0]["Instances"]) <= 5
        index_of = {uid: k for k, uid in enumerate(sources)}
        for instance in key_series[0]["Instances"]:
            path = orthanc.download_instance(instance, tmp_path / f"key-{instance}.dcm")
            key = dcmread(path)
            assert key.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and key.PhotometricInterpretation == "RGB"
            assert list(key.ImageType)[:2] == ["DERIVED", "SECONDARY"] and key.BurnedInAnnotation == "YES"
            assert "(derived)" in key.SeriesDescription
            frame = index_of[key.SourceImageSequence[0].ReferencedSOPInstanceUID]
            rgb = key.pixel_array.astype(int)
            coloured = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) > 20
            mask = masks[1][frame] > 0
            assert mask.any() and coloured[mask].mean() > 0.95 and coloured[~mask].mean() < 0.01
            proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            assert [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")] == []
