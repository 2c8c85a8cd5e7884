"""Turnaround: last instance stored in Orthanc -> SEG + SR stored in Orthanc, with per-stage times.

Real data through the real path: storescu -> Orthanc (StableAge, Lua auto-forward) -> node C-STORE SCP ->
quiet period -> infer job -> SEG + SR -> deliver job (C-STORE) -> Orthanc. Stage boundaries come from the
node's own timestamps (series first/last received, job created/started/finished) and the poll that sees
the results in Orthanc (0.1 s resolution).

    .venv/bin/python benchmarks/turnaround.py [--stable-age 2] [--quiet 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

from dicom_ai_node.devtools.datasets import SeriesInfo, ch2_mr_series, lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.stack import orthanc_with_node


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def run_case(name: str, series: SeriesInfo, orthanc: OrthancServer, node: NodeProcess) -> dict[str, float]:
    storescu(list(series.paths), orthanc.aet, orthanc.dicom_port)
    t_last = time.time()  # storescu returned: the last instance is stored in Orthanc
    while True:
        if orthanc.series_by_modality(series.study_instance_uid, "SEG") and orthanc.series_by_modality(
            series.study_instance_uid, "SR"
        ):
            t_seen = time.time()
            break
        if time.time() - t_last > 600:
            raise TimeoutError(f"{name}: no results\n{node.log_tail()}")
        time.sleep(0.1)
    s = node.get_json(f"/api/series/{series.series_instance_uid}")
    # The objects are visible in Orthanc before the deliver job ends: it reads them back (C-FIND) first.
    while True:
        jobs = [
            j
            for j in node.jobs(limit=100)
            if j["payload"].get("series_instance_uid") == series.series_instance_uid
        ]
        infer = next(j for j in jobs if j["kind"] == "infer")
        deliver = next((j for j in jobs if j["kind"] == "deliver"), None)
        if deliver is not None and deliver["finished_at"]:
            break
        if time.time() - t_seen > 120:
            raise TimeoutError(f"{name}: deliver job did not finish\n{node.log_tail()}")
        time.sleep(0.1)
    t = infer["result"]["timings"]
    return {
        "Orthanc stable age + forward start": ts(s["first_received_at"]) - t_last,
        "forward (Orthanc -> node C-STORE)": ts(s["last_received_at"]) - ts(s["first_received_at"]),
        "quiet period + sweep": ts(infer["created_at"]) - ts(s["last_received_at"]),
        "queue wait": ts(infer["started_at"]) - ts(infer["created_at"]),
        "load series": t["load_s"],
        "inference": t["infer_s"],
        "encode SEG + SR": t["encode_s"],
        "deliver until seen in Orthanc (queue + C-STORE + poll)": t_seen - ts(infer["finished_at"]),
        "total": t_seen - t_last,
        "(deliver job incl. C-FIND read-back, after encode)": ts(deliver["finished_at"])
        - ts(infer["finished_at"]),
        "instances": float(len(series.paths)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stable-age", type=int, default=2)
    ap.add_argument("--quiet", type=float, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with orthanc_with_node(work, stable_age=args.stable_age, quiet_period_s=args.quiet) as (
            orthanc,
            node,
        ):
            # Each series twice (fresh UIDs each time): the first after the node starts pays for the
            # inference process's start and the model's load, the second finds the model warm.
            cases = {
                "CT lung1 -> ct-lung, first": lung_ct_series(work / "ct1", "lung1"),
                "CT lung1 -> ct-lung, warm": lung_ct_series(work / "ct2", "lung1"),
                "MR ch2 -> mr-brain, first": ch2_mr_series(work / "mr1"),
                "MR ch2 -> mr-brain, warm": ch2_mr_series(work / "mr2"),
            }
            results = {name: run_case(name, series, orthanc, node) for name, series in cases.items()}
    names = list(results)
    print(
        f"turnaround, Orthanc StableAge {args.stable_age} s, node quiet period {args.quiet} s, 2-core CPU, seconds"
        " (CT lung1 48 x 512 x 512, MR ch2 181 x 217 x 181)"
    )
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in results[names[0]]:
        cells = [
            f"{results[n][stage]:.0f}" if stage == "instances" else f"{results[n][stage]:.2f}" for n in names
        ]
        print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
