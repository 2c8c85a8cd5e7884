"""Volume loading: `load_series` on a 300-slice 512 x 512 CT, uncompressed and JPEG 2000, one process vs
the parallel decode of dicom_ai_node/infer/decode.py; slices/s.

The series: the 48 real slices of the pyradiomics lung1 chest CT, repeated to 300 slices at 1 mm steps
(each file a real slice image, so JPEG 2000 compresses it as it would a clinical CT: about 4:1 lossless),
written once uncompressed (Explicit VR Little Endian) and once as JPEG 2000 Lossless (pydicom encoding with
pylibjpeg-openjpeg). Each row is the median of `--repeat` loads of the whole load_series (headers,
checks, sort, decode to float32):
- "sequential": every frame decoded in this process (what load_series did before);
- "threads": a thread pool of min(cpu count, 8), at least 2, over the same per-frame decode: shows
  whether the decoder releases the GIL;
- "processes": dicom_ai_node/infer/decode.py's pool of spawned processes, forced to min(cpu count, 8),
  at least 2;
- "load_series": as the node runs it: processes only for compressed series of 64+ frames and only as
  many as there are idle cores (1-minute load average), else sequential.
"CPU s" is the CPU time of this process and its children (the pool's processes). Every row checks that
the volume equals the sequential one. The 1-minute load average is printed per row: the machine may be
shared.

    .venv/bin/python benchmarks/volume_load.py [--slices 300] [--repeat 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
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
from dicom_ai_node.infer import decode
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


# load_series's own decode (decode_into calls it); the modes below replace it for one load.
DECODE_FRAMES = decode.decode_frames


def pool_size() -> int:
    return max(2, min(len(os.sched_getaffinity(0)), decode.MAX_DECODE_WORKERS))


@contextmanager
def decoding(mode: str) -> Iterator[None]:
    """load_series with its frames decoded as `mode` says (the decode loop itself is load_series's own)."""
    if mode == "load_series":
        yield
        return

    def sequential(fn: Callable[..., np.ndarray], items: list[object], workers: int) -> Iterator[np.ndarray]:
        return DECODE_FRAMES(fn, items, 1)

    def processes(fn: Callable[..., np.ndarray], items: list[object], workers: int) -> Iterator[np.ndarray]:
        return DECODE_FRAMES(fn, items, pool_size())

    def threads(fn: Callable[..., np.ndarray], items: list[object], workers: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(pool_size()) as pool:
            return iter(list(pool.map(fn, items)))

    chosen = {"sequential": sequential, "threads": threads, "processes": processes}[mode]
    with mock.patch.object(decode, "decode_frames", chosen):
        yield


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(paths: list[Path], mode: str, repeat: int) -> tuple[float, float, Volume]:
    """(median wall s, median CPU s, the volume) of `repeat` loads."""
    times, cpu = [], []
    loaded: Volume | None = None
    for _ in range(repeat):
        with decoding(mode):
            t, c = time.perf_counter(), cpu_seconds()
            loaded = load_series(paths)
            times.append(time.perf_counter() - t)
            cpu.append(cpu_seconds() - c)
    assert loaded is not None
    return statistics.median(times), statistics.median(cpu), loaded


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
            reference: np.ndarray | None = None
            for mode in ("sequential", "threads", "processes", "load_series"):
                load = os.getloadavg()[0]
                workers = decode.decode_workers(len(paths), name != "uncompressed")
                seconds, cpu, loaded = measure(paths, mode, args.repeat)
                if reference is None:
                    reference = loaded.array
                elif not np.array_equal(loaded.array, reference):
                    raise AssertionError(f"{name}, {mode}: the volume differs from the sequential decode")
                count = {"sequential": 1, "threads": pool_size(), "processes": pool_size()}
                rows.append((name, size_mb, mode, count.get(mode, workers), seconds, cpu, load))
                print(f"measured {name} {mode}: {seconds:.2f} s", file=sys.stderr)
    cpus = len(os.sched_getaffinity(0))
    print(f"load_series, {args.slices} x 512 x 512 CT, median of {args.repeat}, {cpus} CPUs")
    print(
        "| series | MB on disk | decode | processes / threads | s | slices/s | speed-up | CPU s "
        "| load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    sequential = {r[0]: r[4] for r in rows if r[2] == "sequential"}
    for name, size_mb, mode, workers, seconds, cpu, load in rows:
        print(
            f"| {name} | {size_mb:.0f} | {mode} | {workers} | {seconds:.2f} | {args.slices / seconds:.0f} "
            f"| {sequential[name] / seconds:.2f} | {cpu:.1f} | {load:.1f} |"
        )


if __name__ == "__main__":
    main()
