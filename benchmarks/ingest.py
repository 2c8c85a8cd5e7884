"""Ingest benchmark: C-STORE into the node vs DCMTK storescp (TCP_NODELAY=1), same sender, same data.

Both receivers get the same N CT instances (512x512, ~0.5 MB) from DCMTK storescu with TCP_NODELAY=1 over
loopback, one association; the table prints instances/s and the node/storescp ratio measured in this run.
The node persists durably (fsync file + dir + SQLite commit per instance); storescp never fsyncs.

    .venv/bin/python benchmarks/ingest.py [--instances 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.synthetic import write_ct_series


def timed_storescu(files_dir: Path, port: int, called: str) -> float:
    """Seconds for storescu to send the folder (+sd scans it, -nh skips the file header check)."""
    t0 = time.perf_counter()
    storescu([files_dir], called, port, "STORESCU", "+sd", "-nh")
    return time.perf_counter() - t0


def bench_storescp(files_dir: Path, work: Path) -> float:
    out = work / "storescp-out"
    try:
        with storescp(out, aet="STORESCP") as port:
            return timed_storescu(files_dir, port, "STORESCP")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_node(files_dir: Path, work: Path) -> float:
    node = NodeProcess(work / "node", pacs_aet="NOPACS", pacs_port=free_port(), serve_args=("--no-workers",))
    node.start()
    try:
        return timed_storescu(files_dir, node.dicom_port, node.ae_title)
    finally:
        node.stop()
        shutil.rmtree(work / "node", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files_dir = work / "ct"
        write_ct_series(files_dir, n_slices=args.instances, rows=512, cols=512)
        size_mb = sum(f.stat().st_size for f in files_dir.iterdir()) / 1e6
        ref, node = [], []
        for _ in range(args.repeat):
            ref.append(bench_storescp(files_dir, work))
            node.append(bench_node(files_dir, work))
        n = args.instances
        r_ref, r_node = n / statistics.median(ref), n / statistics.median(node)
        print(
            f"ingest: {n} CT instances 512x512 ({size_mb:.0f} MB), storescu TCP_NODELAY=1, loopback, "
            f"median of {args.repeat}"
        )
        print("| receiver | inst/s | MB/s | ratio vs storescp |")
        print("|---|---|---|---|")
        print(f"| DCMTK storescp (no fsync) | {r_ref:.0f} | {r_ref * size_mb / n:.0f} | 1.00 |")
        print(
            f"| dicom-ai-node SCP (fsync + SQLite commit) | {r_node:.0f} | {r_node * size_mb / n:.0f} | "
            f"{r_node / r_ref:.2f} |"
        )


if __name__ == "__main__":
    main()
