"""Model benchmark: inference time and peak memory per built-in model on the sizes the issue names.

Cases (real images, no synthetic shortcuts):
- chest CT 512 x 512 x 300: the real pyradiomics lung1 CT (512 x 512 x 48 at 5 mm) interpolated along z
  to 300 slices (0.8 mm), the size of a thin-slice clinical chest CT;
- brain MR 1 mm: the real ch2 T1 (181 x 217 x 181, 1 mm isotropic) from Debian mricron-data.

Each (model, case) runs in its own process so peak RSS is that model's alone: load (cold), then
`--repeat` warm inferences; the table prints the median warm time, the cold load, peak RSS and, per
case, the ratio against the reference measured in the same run (for CT: the classical baseline;
for every row: the issue's 30 s target). Threads are pinned to 2 (the CI machine's cores).

    .venv/bin/python benchmarks/models.py [--repeat 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import cast

import nibabel as nib
import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_ai_node.devtools.datasets import CH2_PATH, lung_nrrd_path, nrrd_voxel_to_patient
from dicom_ai_node.infer.volume import Volume

TARGET_S = 30.0
CASES = {
    "ct-512x512x300": ["ct-lung", "ct-lung-classical"],
    "mr-brain-1mm": ["mr-brain"],
}


def _ct_volume() -> Volume:
    import nrrd
    import torch
    import torch.nn.functional as F

    hu, header = nrrd.read(str(lung_nrrd_path("lung1_image.nrrd")))
    affine = nrrd_voxel_to_patient(header)
    frames = 300
    source = torch.from_numpy(np.ascontiguousarray(hu.transpose(2, 1, 0), dtype=np.float32))
    # (frames, rows, cols) -> (300, rows, cols): linear along z only, in-plane untouched.
    resized = F.interpolate(
        source.permute(1, 2, 0).reshape(1, -1, source.shape[0]), size=frames, mode="linear"
    )
    array = resized.reshape(source.shape[1], source.shape[2], frames).permute(2, 0, 1).contiguous().numpy()
    affine = affine.copy()
    affine[:3, 2] *= (source.shape[0] - 1) / (frames - 1)
    return _volume(array, affine, "CT")


def _mr_volume() -> Volume:
    image = cast(nib.Nifti1Image, nib.load(CH2_PATH))
    data = np.asarray(image.get_fdata(dtype=np.float32))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    return _volume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, "MR")


def _volume(array: np.ndarray, affine: np.ndarray, modality: str) -> Volume:
    """A Volume (frames, rows, cols) with minimal headers: what a model's segment() reads."""
    series_uid = generate_uid()
    headers = []
    for _ in range(array.shape[0]):
        ds = Dataset()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        headers.append(ds)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(array, headers, [], (spacing[2], spacing[1], spacing[0]), affine, modality)


def run_one(model_name: str, case: str, repeat: int, device: str) -> dict[str, object]:
    import torch

    torch.set_num_threads(2)
    from dicom_ai_node.infer.registry import default_registry

    volume = _ct_volume() if case.startswith("ct") else _mr_volume()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    model = default_registry(device).get(model_name)
    load_s = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        labels = model.segment(volume)  # type: ignore[union-attr]
        times.append(time.perf_counter() - t)
    return {
        "model": model_name,
        "case": case,
        "shape": list(volume.shape),
        "device": getattr(model, "device", device),
        "load_s": load_s,
        "warm_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "volume_rss_mb": rss_before,
        "labelled_voxels": int(np.count_nonzero(labels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.repeat, args.device)))
        return

    rows = []
    for case, models in CASES.items():
        for model in models:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                model,
                case,
                "--repeat",
                str(args.repeat),
                "--device",
                args.device,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"measured {model} on {case}", file=sys.stderr)
    reference = {r["case"]: r["warm_s"] for r in rows if r["model"] in ("ct-lung-classical", "mr-brain")}
    print(
        f"| model | case | device | shape (frames, rows, cols) | warm inference s | cold load s | peak RSS MB "
        f"| ratio vs reference | ratio vs {TARGET_S:.0f} s target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = reference.get(str(r["case"]))
        ratio = f"{float(r['warm_s']) / ref:.2f}" if ref else "-"
        print(
            f"| {r['model']} | {r['case']} | {r['device']} | {tuple(r['shape'])} | {float(r['warm_s']):.1f} "
            f"| {float(r['load_s']):.1f} | {float(r['peak_rss_mb']):.0f} | {ratio} "
            f"| {float(r['warm_s']) / TARGET_S:.2f} |"
        )


if __name__ == "__main__":
    main()
