"""Turnaround: last instance stored in Orthanc -> SEG + SR stored (and verified) in Orthanc, per stage.

Real data through the real path: storescu -> Orthanc (StableAge, Lua auto-forward) -> node C-STORE SCP ->
completion -> infer job -> SEG + SR -> deliver job (C-STORE + C-FIND read-back) -> Orthanc. The Orthanc
peer has `series_complete_on_release` (Orthanc forwards each stable series in one association), so the
series is complete when Orthanc releases that association; `--no-release-signal` measures the quiet
period instead (the reference, same run). Stage boundaries come from the node's own timestamps (series
first/last received, job created/started/finished, the infer job's load/infer/encode timings) and the
poll that sees the results in Orthanc (0.05 s resolution).

Cases: the real lung1 CT (48 x 512 x 512) and ch2 MR (181 x 217 x 181), each first (cold model) and warm,
and a thin-slice chest CT of 300 x 512 x 512 (lung1 interpolated along z to 0.8 mm), the size of the
issue's turnaround target: everything except the model's forward pass <= 3 s. For that case the model's
own stages (preprocess to the model grid, sliding-window forward pass, labels back to the source grid)
are measured after the node stopped, in this process, on the same files.

    .venv/bin/python benchmarks/turnaround.py [--stable-age 2] [--quiet 5] [--cases ct300,ct48,mr]
        [--no-release-signal] [--profile DIR]

`--profile DIR` records the node process with py-spy during the 300-slice cases (DIR/node-ct300.txt,
collapsed stacks) and prints the functions with the most samples in the worker threads.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_ai_node.devtools.datasets import SeriesInfo, ch2_mr_series, lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.stack import orthanc_with_node

THIN_FRAMES = 300
NODE_STAGES = (
    "completion (last instance -> infer job)",
    "queue wait",
    "load series",
    "inference (host: volume to child, model, labels back)",
    "encode SEG + SR",
    "deliver until seen in Orthanc (queue + C-STORE + poll)",
    "deliver job incl. C-FIND read-back, after encode",
)


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def thin_slice_ct(dest: Path, frames: int = THIN_FRAMES) -> tuple[Path, ...]:
    """The real lung1 CT (48 x 512 x 512, 5 mm) interpolated linearly along z to `frames` slices, written as
    a new series of a new study (fresh UIDs): a thin-slice chest CT of clinical size."""
    source = lung_ct_series(dest / "source", "lung1")
    stored = source.pixel_array.astype(np.float32)  # (48, rows, cols), HU + 1024
    position = np.linspace(0, stored.shape[0] - 1, frames)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, stored.shape[0] - 1)
    weight = (position - below)[:, None, None].astype(np.float32)
    thin = np.rint(stored[below] * (1 - weight) + stored[above] * weight).astype(np.uint16)
    spacing = source.slice_spacing * (stored.shape[0] - 1) / (frames - 1)
    normal = source.voxel_to_patient[:3, 2] / np.linalg.norm(source.voxel_to_patient[:3, 2])
    origin = np.array(source.image_positions_patient[0])
    study, series = generate_uid(), generate_uid()
    template = dcmread(source.paths[0])
    out = dest / "thin"
    out.mkdir(parents=True)
    paths = []
    for f in range(frames):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = f + 1
        ipp = origin + normal * spacing * f
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.SliceLocation = round(float(np.dot(normal, ipp)), 4)
        ds.SliceThickness = round(spacing, 6)
        ds.SeriesDescription = "CHEST CT THIN"
        ds.PixelData = np.ascontiguousarray(thin[f], dtype="<u2").tobytes()
        path = out / f"{f:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return tuple(paths)


class Profiler:
    """py-spy recording the node process while a case runs (collapsed stacks, all threads)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        py_spy = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen(
            [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--threads"]
            + ["--nonblocking", "--subprocesses", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.send_signal(2)  # py-spy writes its file on SIGINT
        self.proc.wait(timeout=60)


def top_functions(collapsed: Path, thread_prefix: str, n: int = 15) -> list[tuple[str, int, int]]:
    """(function, samples where it is on the stack, samples where it is the leaf) for threads whose name
    starts with `thread_prefix`, most on-stack samples first."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # "process PID:CMDLINE" (--subprocesses), then "thread (TID): NAME" (--threads), then the frames.
        at = next((i for i, f in enumerate(frames[:2]) if f.startswith("thread (")), None)
        if at is None or not frames[at].partition(": ")[2].startswith(thread_prefix):
            continue
        samples = int(count)
        names = [re.sub(r":\d+\)$", ")", frame) for frame in frames[at + 1 :]]
        for name in set(names):
            inclusive[name] += samples
        if names:
            leaf[names[-1]] += samples
    return [(name, count, leaf[name]) for name, count in inclusive.most_common(n)]


def run_case(
    name: str,
    paths: tuple[Path, ...],
    orthanc: OrthancServer,
    node: NodeProcess,
    profile: Path | None,
    index: int = 0,
) -> dict[str, float]:
    first = dcmread(paths[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    load_before = os.getloadavg()[0]
    profiler = (
        Profiler(node.proc.pid, profile / f"node-case{index}.txt")
        if (profile is not None and node.proc is not None)
        else None
    )
    storescu(list(paths), orthanc.aet, orthanc.dicom_port)
    t_last = time.time()  # storescu returned: the last instance is stored in Orthanc
    while True:
        if orthanc.series_by_modality(study_uid, "SEG") and orthanc.series_by_modality(study_uid, "SR"):
            t_seen = time.time()
            break
        if time.time() - t_last > 900:
            raise TimeoutError(f"{name}: no results\n{node.log_tail()}")
        time.sleep(0.05)
    s = node.get_json(f"/api/series/{series_uid}")
    # The objects are visible in Orthanc before the deliver job ends: it reads them back (C-FIND) first.
    while True:
        jobs = [j for j in node.jobs(limit=100) if j["payload"].get("series_instance_uid") == series_uid]
        infer = next(j for j in jobs if j["kind"] == "infer")
        deliver = next((j for j in jobs if j["kind"] == "deliver"), None)
        if deliver is not None and deliver["finished_at"]:
            break
        if time.time() - t_seen > 120:
            raise TimeoutError(f"{name}: deliver job did not finish\n{node.log_tail()}")
        time.sleep(0.05)
    if profiler is not None:
        profiler.stop()
    t = infer["result"]["timings"]
    last = ts(s["last_received_at"])
    verified = ts(deliver["finished_at"])
    return {
        "Orthanc stable age + forward start": ts(s["first_received_at"]) - t_last,
        "forward (Orthanc -> node C-STORE)": last - ts(s["first_received_at"]),
        NODE_STAGES[0]: ts(infer["created_at"]) - last,
        NODE_STAGES[1]: ts(infer["started_at"]) - ts(infer["created_at"]),
        NODE_STAGES[2]: t["load_s"],
        NODE_STAGES[3]: t["infer_s"],
        NODE_STAGES[4]: t["encode_s"],
        NODE_STAGES[5]: t_seen - ts(infer["finished_at"]),
        NODE_STAGES[6]: verified - ts(infer["finished_at"]),
        "node: last instance in -> results verified in Orthanc": verified - last,
        "total: last instance into Orthanc -> results seen in Orthanc": t_seen - t_last,
        "instances": float(len(paths)),
        "load average (1 min) before the case": load_before,
        "_complete_note": 1.0 if s["route_note"].endswith("association released") else 0.0,
    }


def model_stages(
    paths: tuple[Path, ...], repeat: int = 2, profile: bool = False
) -> dict[str, tuple[float, float]]:
    """ct-lung's own stages on the series, warm (the last of `repeat` runs), in this process: to the model
    grid, the sliding-window forward pass, labels back to the source grid; and loading the series.
    `profile`: one more run of the pre- and postprocessing under cProfile, its top lines printed."""
    from dicom_ai_node.infer.grid import labels_to_source_grid, to_model_grid
    from dicom_ai_node.infer.registry import default_registry
    from dicom_ai_node.infer.volume import load_series

    model: Any = default_registry("cpu").get("ct-lung")
    out: dict[str, tuple[float, float]] = {}
    for _ in range(repeat):
        # (wall, CPU of this process's threads): CPU time says more than wall time on a busy machine.
        marks = [(time.perf_counter(), time.process_time())]
        volume = load_series(list(paths))
        marks.append((time.perf_counter(), time.process_time()))
        prepared, grid = to_model_grid(volume, model.manifest.input)
        marks.append((time.perf_counter(), time.process_time()))
        probabilities = model.probabilities(prepared)
        marks.append((time.perf_counter(), time.process_time()))
        labels_to_source_grid(probabilities, grid, [s.label_value for s in model.segments])
        marks.append((time.perf_counter(), time.process_time()))
        stages = (
            "load series (in process)",
            "preprocess: to the model grid",
            "forward pass (sliding window)",
            "postprocess: labels to the source grid",
        )
        out = {
            stage: (marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1])
            for i, stage in enumerate(stages)
        }
    if profile:
        volume = load_series(list(paths))
        for title, call in (
            ("preprocess: to_model_grid", lambda: to_model_grid(volume, model.manifest.input)),
            (
                "postprocess: labels_to_source_grid",
                lambda: labels_to_source_grid(probabilities, grid, [s.label_value for s in model.segments]),
            ),
        ):
            profiler = cProfile.Profile()
            profiler.runcall(call)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
            lines = [line for line in text.getvalue().splitlines() if line.strip()]
            start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
            print(f"\ncProfile {title} (by own time):\n" + "\n".join(lines[start:]), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stable-age", type=int, default=2)
    ap.add_argument("--quiet", type=float, default=5, help="the node's quiet period (the rules' is 5 s)")
    ap.add_argument("--cases", default="ct300,ct48,mr", help="comma-separated: ct300, ct48, mr")
    ap.add_argument("--no-release-signal", action="store_true", help="the quiet period decides (reference)")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the node during the ct300 cases")
    args = ap.parse_args()
    wanted = set(args.cases.split(","))
    signal = not args.no_release_signal
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    thin: tuple[Path, ...] = ()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Each series twice, with fresh UIDs: the first case of a model after the node starts pays for the
        # inference process's start and the model's load ("first"), the next one finds it warm.
        planned: list[tuple[str, str, tuple[Path, ...]]] = []
        if "ct300" in wanted:
            thin = thin_slice_ct(work / "ct300a")
            planned += [("CT 300 x 512 x 512", "ct-lung", thin)]
            planned += [("CT 300 x 512 x 512", "ct-lung", thin_slice_ct(work / "ct300b"))]
        if "ct48" in wanted:
            for run in ("ct1", "ct2"):
                planned += [("CT lung1", "ct-lung", lung_ct_series(work / run, "lung1").paths)]
        if "mr" in wanted:
            for run in ("mr1", "mr2"):
                series: SeriesInfo = ch2_mr_series(work / run)
                planned += [("MR ch2", "mr-brain", series.paths)]
        cases: dict[str, tuple[Path, ...]] = {}
        seen: set[str] = set()
        for label, model_name, paths in planned:
            name = f"{label} -> {model_name}, {'warm' if model_name in seen else 'first'}"
            seen.add(model_name)
            if name in cases:
                name += f" ({sum(n.startswith(name) for n in cases) + 1})"
            cases[name] = paths
        with orthanc_with_node(
            work,
            stable_age=args.stable_age,
            quiet_period_s=args.quiet,
            pacs_complete_on_release=signal,
        ) as (orthanc, node):
            for name, paths in cases.items():
                profile = args.profile if name.startswith("CT 300") else None
                results[name] = run_case(name, paths, orthanc, node, profile, len(results))
                print(
                    f"{name}: {results[name]['node: last instance in -> results verified in Orthanc']:.2f} s",
                    file=sys.stderr,
                )
        model = model_stages(thin, profile=args.profile is not None) if thin else {}
    names = list(results)
    print(
        f"turnaround, Orthanc StableAge {args.stable_age} s, completion "
        + ("on Orthanc's association release" if signal else "by the rules' quiet period (5 s)")
        + f", {os.cpu_count()}-core CPU, seconds"
    )
    print("| stage | " + " | ".join(n.strip() for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in results[names[0]]:
        if stage.startswith("_"):
            continue
        cells = [
            f"{results[n][stage]:.0f}" if stage == "instances" else f"{results[n][stage]:.2f}" for n in names
        ]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    signalled = [n for n in names if results[n]["_complete_note"]]
    print(f"\ncomplete by the release signal: {len(signalled)} of {len(names)} cases")
    if model:
        print("\nct-lung on the 300-slice CT, warm, in this process (after the node stopped):")
        print("| model stage | wall s | CPU s |\n|---|---|---|")
        for stage, (wall, cpu) in model.items():
            print(f"| {stage} | {wall:.2f} | {cpu:.2f} |")
        for name in names:
            if name.startswith("CT 300"):
                r = results[name]
                node_s = r["node: last instance in -> results verified in Orthanc"]
                forward = model["forward pass (sliding window)"][0]
                print(
                    f"{name}: node turnaround {node_s:.2f} s, minus the forward pass {forward:.2f} s"
                    f" = {node_s - forward:.2f} s (target <= 3 s)"
                )
    if args.profile is not None:
        for path in sorted(args.profile.glob("node-*.txt")):
            print(
                f"\npy-spy {path.name}: worker-infer thread, top functions (on-stack samples, leaf samples)"
            )
            for fn, inclusive, leaf in top_functions(path, "worker-infer"):
                print(f"  {inclusive:6d} {leaf:6d}  {fn}")
            print(f"py-spy {path.name}: worker-deliver thread")
            for fn, inclusive, leaf in top_functions(path, "worker-deliver", 10):
                print(f"  {inclusive:6d} {leaf:6d}  {fn}")


if __name__ == "__main__":
    main()
