"""The main job on the embedded default: a local Orthanc, the node (SQLite, local spool), a real brain MR
and a real chest CT going through, and where to see the results.

    bash scripts/demo.sh [--exit]       (--exit: stop everything once the results are in)
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.datasets import ch2_mr_series, lung_ct_series  # noqa: E402
from tests.support.dcmtk import storescu  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.stack import orthanc_with_node  # noqa: E402


def has_results(orthanc: OrthancServer, study_uid: str) -> bool:
    return all(orthanc.series_by_modality(study_uid, modality) for modality in ("SEG", "SR"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exit", action="store_true", help="stop once the results are in")
    args = ap.parse_args()

    work = ROOT / "var" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    print(f"[demo] working directory {work}")
    print("[demo] starting Orthanc (Debian package, native, loopback only) and the node: dicom-ai-node serve")
    with orthanc_with_node(work) as (orthanc, node):
        print(f"[demo] Orthanc {orthanc.http_url}/ , DICOM {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        print(f"[demo] node AINODE@127.0.0.1:{node.dicom_port} (SQLite, local spool), admin {node.http_url}/")
        print("[demo] writing sample studies: ch2 T1 brain MR (mricron-data), lung1 chest CT (pyradiomics)")
        mr = ch2_mr_series(work / "input" / "mr")
        ct = lung_ct_series(work / "input" / "ct", "lung1")
        paths = [*mr.paths, *ct.paths]
        print(f"[demo] storescu {len(paths)} instances -> {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        t0 = time.monotonic()
        storescu(paths, orthanc.aet, orthanc.dicom_port, "MODALITY")
        print(
            f"[demo] sent in {time.monotonic() - t0:.1f} s; Orthanc forwards each stable series to the node"
        )
        pending = {"brain MR": mr.study_instance_uid, "chest CT": ct.study_instance_uid}
        while pending and time.monotonic() - t0 < 600:
            for name, uid in list(pending.items()):
                if has_results(orthanc, uid):
                    del pending[name]
                    print(f"[demo] {name}: SEG + SR stored in Orthanc after {time.monotonic() - t0:.1f} s")
            time.sleep(1)
        if pending:
            print(f"[demo] results missing for {list(pending)}; node log tail:\n{node.log_tail()}")
            return 1
        print("\n[demo] results")
        for job in sorted(node.jobs(), key=lambda j: j["id"]):
            if job["kind"] == "infer" and job["result"]:
                r = job["result"]
                timings = ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())
                print(
                    f"  {r['model']} {r['model_version']} (rule {r['rule_id']} v{r['rule_version']}): "
                    f"{r['volumes_cm3']} cm3; {timings}"
                )
        print("\n[demo] where to look")
        for name, series in (("brain MR", mr), ("chest CT", ct)):
            study_id = orthanc.find_study(series.study_instance_uid)
            print(f"  {name}: {orthanc.http_url}/app/explorer.html#study?uuid={study_id}")
        print(f"  Orthanc DICOMweb: {orthanc.dicomweb_url}/   (OHIF or any DICOMweb viewer)")
        print(f"  admin page:       {node.http_url}/  (no account exists by default; create yours with")
        print(
            f"                    .venv/bin/dicom-ai-node users add NAME --role admin -c {node.config_path})"
        )
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
            print("[demo] stopping")


if __name__ == "__main__":
    sys.exit(main())
