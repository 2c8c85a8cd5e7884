"""Check ct-lung as the node runs it: Dice per lung on the real CTs sent as DICOM, and CPU time.

    python -m dicom_ai_node.training.evaluate [--model-dir DIR]   # Dice table, ct-lung vs classical
    python -m dicom_ai_node.training.evaluate --timing            # 512 x 512 x 300 CT: seconds, peak RSS

The real CTs are written as a CT Image Storage series (one file per frame, HU stored + 1024 with
RescaleIntercept -1024, as a scanner would) and read back with dicom_ai_node.infer.volume.load_series,
so the models see exactly what the node would give them. Held-out phantoms (seeds never used in
training) are segmented from their Volume directly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_ai_node.infer.base import Model, SegmentationModel
from dicom_ai_node.infer.manifest import load_manifest
from dicom_ai_node.infer.registry import BUILTIN_MODELS_DIR, build_model, default_registry
from dicom_ai_node.infer.volume import Volume, load_series
from dicom_ai_node.training.data import REAL_CASES, load_real_ct, load_reference
from dicom_ai_node.training.phantoms import make_phantom
from dicom_ai_node.training.train_ct_lung import HELD_OUT_PHANTOM_SEEDS

LUNGS = {"right": 1, "left": 2}


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & reference).sum()) / total


def lung_dice(labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {name: dice(labels == value, reference == value) for name, value in LUNGS.items()}


def write_ct_series(volume: Volume, dest_dir: Path) -> list[Path]:
    """Write a HU volume whose frames run along +normal as single-frame CT instances; returns the paths."""
    affine = volume.affine_lps
    col_spacing, row_spacing, step = (float(np.linalg.norm(affine[:3, n])) for n in range(3))
    row_dir, col_dir = affine[:3, 0] / col_spacing, affine[:3, 1] / row_spacing
    if float(np.cross(row_dir, col_dir) @ affine[:3, 2]) <= 0:
        raise ValueError("frames must run along the slice normal (row direction x column direction)")
    stored = np.clip(np.rint(volume.array) + 1024, 0, 4095).astype(np.uint16)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(stored.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.PatientName, ds.PatientID = "Test^Phantom", "TEST-PHANTOM-0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", "CHEST", 1, k + 1
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in (affine @ np.array([0, 0, k, 1]))[:3]]
        ds.PixelSpacing = [round(row_spacing, 6), round(col_spacing, 6)]
        ds.SliceThickness = round(step, 6)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<u2").tobytes()
        path = dest_dir / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def through_dicom(volume: Volume, dest_dir: Path) -> Volume:
    """The volume written as DICOM and read back as the node reads a series."""
    loaded = load_series(write_ct_series(volume, dest_dir))
    if loaded.shape != volume.shape or not np.allclose(loaded.affine_lps, volume.affine_lps, atol=1e-3):
        raise ValueError("DICOM round trip changed the grid")
    return loaded


def segment_timed(model: Model, volume: Volume) -> tuple[np.ndarray, float]:
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"{model.identity.name} is not a segmentation model")
    started = time.perf_counter()
    labels = model.segment(volume)
    return np.asarray(labels), time.perf_counter() - started


def evaluate(
    models: dict[str, Model], cases: Sequence[str] = REAL_CASES, phantoms: bool = True
) -> dict[str, Any]:
    """Dice per lung and seconds per case for each model, on the real CTs (through DICOM) and phantoms."""
    results: dict[str, Any] = {name: {} for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            volume = through_dicom(load_real_ct(case), Path(tmp) / case)
            reference = load_reference(case)
            for name, model in models.items():
                labels, seconds = segment_timed(model, volume)
                results[name][case] = {**lung_dice(labels, reference), "seconds": seconds}
    if phantoms:
        for seed in HELD_OUT_PHANTOM_SEEDS:
            phantom = make_phantom(seed)
            for name, model in models.items():
                labels, seconds = segment_timed(model, phantom.volume)
                results[name][f"phantom-{seed}"] = {**lung_dice(labels, phantom.labels), "seconds": seconds}
    return results


def _peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux), so VmHWM measures what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def timing(model: Model, repeats: int = 2) -> dict[str, Any]:
    """Seconds and peak RSS for a synthetic 512 x 512 x 300 chest CT at 0.7 x 0.7 x 1 mm."""
    import torch

    torch.set_num_threads(2)
    volume = make_phantom(7, spacing_mm=0.7, slice_mm=1.0, frames=300, flips=(False, False, False)).volume
    seconds = []
    _peak_rss_reset()
    before = _peak_rss_mb()
    for _ in range(repeats):
        _, elapsed = segment_timed(model, volume)
        seconds.append(elapsed)
    return {
        "shape": list(volume.shape),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "rss_before_mb": before,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=BUILTIN_MODELS_DIR / "ct-lung")
    parser.add_argument("--timing", action="store_true", help="time a 512 x 512 x 300 CT instead")
    parser.add_argument("--cases", nargs="*", default=list(REAL_CASES))
    parser.add_argument("--no-phantoms", action="store_true")
    args = parser.parse_args(argv)
    if args.model_dir == BUILTIN_MODELS_DIR / "ct-lung":
        model = default_registry("cpu").get("ct-lung")
    else:
        model = build_model(load_manifest(args.model_dir), "cpu")
    if args.timing:
        print(json.dumps(timing(model), indent=1))
        return
    classical = default_registry("cpu").get("ct-lung-classical")
    results = evaluate({"ct-lung": model, "ct-lung-classical": classical}, args.cases, not args.no_phantoms)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
