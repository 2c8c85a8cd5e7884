"""Volume loading: `load_series` on a 300-slice 512 x 512 CT, uncompressed and JPEG 2000, one process vs
the parallel decode of dicom_ai_node/infer/decode.py; slices/s.

The series: the 48 real slices of the pyradiomics lung1 chest CT, repeated to 300 slices at 1 mm steps
(each file a real slice image, so JPEG 2000 compresses it as it would a clinical CT: about 4:1 lossless),
written once uncompressed (Explicit VR Little Endian) and once as JPEG 2000 Lossless (pydicom encoding with
pylibjpeg-openjpeg). Each row is the median of `--repeat` loads. "sequential" decodes every frame in this
process (what load_series did before); "parallel" is load_series as it is now (a pool of spawned processes
for compressed frames, min(cpu count, 8) of them; uncompressed frames stay in this process); "threads" is
a thread pool over the same per-frame decode, to show whether the decoder releases the GIL. Every row
checks that the volume equals the sequential one. The 1-minute load average is printed before each row:
the machine may be shared.

    .venv/bin/python benchmarks/volume_load.py [--slices 300] [--repeat 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, generate_uid

from dicom_ai_node.devtools.datasets import lung_ct_series
from dicom_ai_node.infer import decode, volume
from dicom_ai_node.infer.volume import Volume, load_series


def write_series(dest: Path, slices: int) -> dict[str, list[Path]]:
    """The uncompressed and the JPEG 2000 copy of a `slices`-slice CT made of lung1's real slices."""
    source = lung_ct_series(dest / "lung1", "lung1")
    series = {"uncompressed": dest / "uncompressed", "JPEG 2000 lossless": dest / "j2k"}
    if all(len(list(d.glob("*.dcm"))) == slices for d in series.values()):
        return {name: sorted(d.glob("*.dcm")) for name, d in series.items()}
    for d in series.values():
        d.mkdir(parents=True, exist_ok=True)
    study, series_uid = generate_uid(), generate_uid()
    origin = np.array(source.image_positions_patient[0])
    normal = np.cross(source.image_orientation_patient[:3], source.image_orientation_patient[3:])
    for f in range(slices):
        ds = pydicom.dcmread(source.paths[f % len(source.paths)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = f + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + normal * 1.0 * f]
        ds.SliceThickness = 1.0
        ds.save_as(series["uncompressed"] / f"{f:04d}.dcm", enforce_file_format=True)
        ds.compress(JPEG2000Lossless)
        ds.save_as(series["JPEG 2000 lossless"] / f"{f:04d}.dcm", enforce_file_format=True)
    return {name: sorted(d.glob("*.dcm")) for name, d in series.items()}


@contextmanager
def decoding(mode: str) -> Iterator[None]:
    """load_series with its frames decoded as `mode` says (the decode loop itself is load_series's own)."""
    if mode == "parallel":
        yield
        return

    def sequential(fn: Callable[..., np.ndarray], items: list[object], workers: int) -> Iterator[np.ndarray]:
        return decode.decode_frames(fn, items, 1)

    def threads(fn: Callable[..., np.ndarray], items: list[object], workers: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(max(2, decode.decode_workers(len(items), True))) as pool:
            return iter(list(pool.map(fn, items)))

    with mock.patch.object(volume, "decode_frames", sequential if mode == "sequential" else threads):
        yield


def measure(paths: list[Path], mode: str, repeat: int) -> tuple[float, Volume]:
    times = []
    loaded: Volume | None = None
    for _ in range(repeat):
        with decoding(mode):
            t = time.perf_counter()
            loaded = load_series(paths)
            times.append(time.perf_counter() - t)
    assert loaded is not None
    return statistics.median(times), loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="keep the written series here (reused)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        t = time.perf_counter()
        series = write_series(data, args.slices)
        print(f"series written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        rows = []
        for name, paths in series.items():
            size_mb = sum(p.stat().st_size for p in paths) / 1e6
            workers = decode.decode_workers(len(paths), name != "uncompressed")
            reference: np.ndarray | None = None
            for mode in ("sequential", "threads", "parallel"):
                load = os.getloadavg()[0]
                seconds, loaded = measure(paths, mode, args.repeat)
                if reference is None:
                    reference = loaded.array
                elif not np.array_equal(loaded.array, reference):
                    raise AssertionError(f"{name}, {mode}: the volume differs from the sequential decode")
                count = {"sequential": 1, "threads": max(2, decode.decode_workers(len(paths), True))}
                rows.append((name, size_mb, mode, count.get(mode, workers), seconds, load))
                print(f"measured {name} {mode}: {seconds:.2f} s", file=sys.stderr)
    cpus = len(os.sched_getaffinity(0))
    print(f"load_series, {args.slices} x 512 x 512 CT, median of {args.repeat}, {cpus} CPUs")
    print(
        "| series | MB on disk | decode | processes / threads | s | slices/s | speed-up | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    sequential = {r[0]: r[4] for r in rows if r[2] == "sequential"}
    for name, size_mb, mode, workers, seconds, load in rows:
        print(
            f"| {name} | {size_mb:.0f} | {mode} | {workers} | {seconds:.2f} | {args.slices / seconds:.0f} "
            f"| {sequential[name] / seconds:.2f} | {load:.1f} |"
        )


if __name__ == "__main__":
    main()
