"""The main job on the embedded default: a local Orthanc, the node (SQLite, local spool), a real brain MR
and a real chest CT going through, and where to see the results.

    bash scripts/demo.sh [--exit]       (--exit: stop everything once the results are in)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.datasets import ch2_mr_series, lung_ct_series  # noqa: E402
from tests.support.node import NodeProcess, free_port  # noqa: E402


def orthanc_json(base: str, path: str, body: str | None = None) -> object:
    data = None if body is None else body.encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def study_results(base: str, study_uid: str) -> dict[str, str]:
    hits = orthanc_json(base, "/tools/lookup", study_uid)  # the body is the bare UID
    study = next((h for h in hits if h["Type"] == "Study"), None)  # type: ignore[union-attr]
    if study is None:
        return {}
    found = {}
    for series in orthanc_json(base, f"/studies/{study['ID']}/series"):  # type: ignore[union-attr]
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SEG", "SR"):
            found[modality] = series["ID"]
    found["study"] = study["ID"]
    return found


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exit", action="store_true", help="stop once the results are in")
    args = ap.parse_args()

    work = ROOT / "var" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    node_port, http_port, o_http, o_dicom = free_port(), free_port(), free_port(), free_port()

    print(f"[demo] working directory {work}")
    print("[demo] starting Orthanc (Debian package, native, loopback only)")
    subprocess.run(
        [
            "bash",
            str(ROOT / "orthanc-dev" / "start-orthanc.sh"),
            "--background",
            "--dir",
            str(work / "orthanc"),
            "--http-port",
            str(o_http),
            "--dicom-port",
            str(o_dicom),
            "--node-port",
            str(node_port),
        ],
        check=True,
    )
    orthanc_pid = int((work / "orthanc" / "orthanc.pid").read_text())
    orthanc = f"http://127.0.0.1:{o_http}"

    print("[demo] starting the node: dicom-ai-node serve (SQLite, local spool)")
    node = NodeProcess(
        work / "node", pacs_aet="ORTHANC", pacs_port=o_dicom, dicom_port=node_port, http_port=http_port
    )
    try:
        node.start()
        print(f"[demo] node AINODE@127.0.0.1:{node_port}, admin {node.http_url}/ (log {node.log_path})")
        print("[demo] writing sample studies: ch2 T1 brain MR (mricron-data), lung1 chest CT (pyradiomics)")
        mr = ch2_mr_series(work / "input" / "mr")
        ct = lung_ct_series(work / "input" / "ct", "lung1")
        print(f"[demo] storescu {len(mr.paths) + len(ct.paths)} instances -> ORTHANC@127.0.0.1:{o_dicom}")
        t0 = time.monotonic()
        subprocess.run(
            [
                "storescu",
                "-aet",
                "MODALITY",
                "-aec",
                "ORTHANC",
                "127.0.0.1",
                str(o_dicom),
                *map(str, [*mr.paths, *ct.paths]),
            ],
            check=True,
            env=dict(os.environ, TCP_NODELAY="1"),
            capture_output=True,
        )
        print(
            f"[demo] sent in {time.monotonic() - t0:.1f} s; Orthanc forwards each stable series to the node"
        )
        pending = {"brain MR": mr.study_instance_uid, "chest CT": ct.study_instance_uid}
        done: dict[str, dict[str, str]] = {}
        while pending and time.monotonic() - t0 < 600:
            for name, uid in list(pending.items()):
                found = study_results(orthanc, uid)
                if "SEG" in found and "SR" in found:
                    done[name] = found
                    del pending[name]
                    print(f"[demo] {name}: SEG + SR stored in Orthanc after {time.monotonic() - t0:.1f} s")
            time.sleep(1)
        if pending:
            print(f"[demo] results missing for {list(pending)}; node log tail:\n{node.log_tail()}")
            return 1
        print("\n[demo] results")
        for job in sorted(node.get_json("/api/jobs"), key=lambda j: j["id"]):
            if job["kind"] == "infer" and job["result"]:
                r = job["result"]
                timings = ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())
                print(
                    f"  {r['model']} {r['model_version']} (rule {r['rule_id']} v{r['rule_version']}): "
                    f"{r['volumes_cm3']} cm3; {timings}"
                )
        print("\n[demo] where to look")
        for name, found in done.items():
            print(f"  {name}: {orthanc}/app/explorer.html#study?uuid={found['study']}")
        print(f"  Orthanc DICOMweb: {orthanc}/dicom-web/   (OHIF or any DICOMweb viewer)")
        print(f"  admin page:       {node.http_url}/")
        if args.exit:
            return 0
        print("\n[demo] running; press Ctrl-C to stop Orthanc and the node")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
    finally:
        node.stop()
        os.kill(orthanc_pid, signal.SIGTERM)
        print("[demo] stopped")


if __name__ == "__main__":
    sys.exit(main())
