"""`dicom-ai-node demo`: the main job on the embedded default, end to end on this machine.

A local Orthanc (Debian package, loopback only), the node (`dicom-ai-node serve`: SQLite, local spool),
a real brain MR and a real chest CT sent to Orthanc with DCMTK storescu; Orthanc forwards each stable
series to the node, which sends SEG + SR back. The demo waits for them and says where to look.

Development tool: it runs the dev tools' runners (dicom_ai_node.devtools), so it needs a source checkout
with what scripts/bootstrap.sh installs (`bash scripts/demo.sh` does both).
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from dicom_ai_node.devtools.datasets import SeriesInfo
    from dicom_ai_node.devtools.node import NodeProcess
    from dicom_ai_node.devtools.orthanc import OrthancServer

# The demo's own account: it only reads the job list (GET /api/jobs), so a viewer.
DEMO_API_USER = "demo-viewer"
RESULTS_TIMEOUT_S = 600


def _say(message: str) -> None:
    typer.echo(f"[demo] {message}")


def _has_results(orthanc: OrthancServer, study_instance_uid: str) -> bool:
    return all(orthanc.series_by_modality(study_instance_uid, modality) for modality in ("SEG", "SR"))


def _wait_for_results(
    orthanc: OrthancServer, node: NodeProcess, studies: dict[str, str], t0: float
) -> list[str]:
    """Poll Orthanc until every study (name -> Study Instance UID) has a SEG and an SR; the names left.

    Gives up at once when the node process has exited (its log tail says why).
    """
    pending = dict(studies)
    while pending and node.running and time.monotonic() - t0 < RESULTS_TIMEOUT_S:
        for name, uid in list(pending.items()):
            if _has_results(orthanc, uid):
                del pending[name]
                _say(f"{name}: SEG + SR stored in Orthanc after {time.monotonic() - t0:.1f} s")
        time.sleep(1)
    return list(pending)


def _print_summary(orthanc: OrthancServer, node: NodeProcess, series: dict[str, SeriesInfo]) -> None:
    typer.echo("\n[demo] results")
    for job in sorted(node.jobs(), key=lambda j: int(j["id"])):
        result = job.get("result")
        if job["kind"] == "infer" and result:
            timings = ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items())
            typer.echo(
                f"  {result['model']} {result['model_version']} "
                f"(rule {result['rule_id']} v{result['rule_version']}): "
                f"{result['volumes_cm3']} cm3; {timings}"
            )
    typer.echo("\n[demo] where to look")
    for name, info in series.items():
        study_id = orthanc.find_study(info.study_instance_uid)
        typer.echo(f"  {name}: {orthanc.http_url}/app/explorer.html#study?uuid={study_id}")
    typer.echo(f"  Orthanc DICOMweb: {orthanc.dicomweb_url}/   (OHIF or any DICOMweb viewer)")
    typer.echo(f"  admin page:       {node.http_url}/  (no admin account exists; create yours with")
    typer.echo(
        f"                    .venv/bin/dicom-ai-node users add NAME --role admin -c {node.config_path})"
    )


def _wait_for_interrupt() -> None:
    typer.echo("\n[demo] running; press Ctrl-C to stop Orthanc and the node")

    def on_sigterm(*_: object) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)  # stop as on Ctrl-C, so both are shut down cleanly
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        _say("stopping")


def demo_command(
    exit_: Annotated[bool, typer.Option("--exit", help="Stop everything once the results are in.")] = False,
    workdir: Annotated[
        Path | None,
        typer.Option("--dir", help="Working directory (default: var/demo/<timestamp> in the checkout)."),
    ] = None,
) -> None:
    """Run the demo: Orthanc + the node, a brain MR and a chest CT through, SEG + SR back into Orthanc."""
    from dicom_ai_node.devtools.datasets import ch2_mr_series, lung_ct_series
    from dicom_ai_node.devtools.dcmtk import storescu
    from dicom_ai_node.devtools.repo import ROOT
    from dicom_ai_node.devtools.stack import orthanc_with_node
    from dicom_ai_node.domain.auth import Role

    work = workdir or ROOT / "var" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    _say(f"working directory {work}")
    _say("starting Orthanc (Debian package, native, loopback only) and the node: dicom-ai-node serve")
    with orthanc_with_node(work, api_user=DEMO_API_USER, api_role=Role.VIEWER) as (orthanc, node):
        _say(f"Orthanc {orthanc.http_url}/ , DICOM {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        _say(
            f"node {node.ae_title}@127.0.0.1:{node.dicom_port} (SQLite, local spool), admin {node.http_url}/"
        )
        _say("writing sample studies: ch2 T1 brain MR (mricron-data), lung1 chest CT (pyradiomics)")
        series = {
            "brain MR": ch2_mr_series(work / "input" / "mr"),
            "chest CT": lung_ct_series(work / "input" / "ct", "lung1"),
        }
        paths = [path for info in series.values() for path in info.paths]
        _say(f"storescu {len(paths)} instances -> {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        t0 = time.monotonic()
        storescu(paths, orthanc.aet, orthanc.dicom_port, "MODALITY")
        _say(f"sent in {time.monotonic() - t0:.1f} s; Orthanc forwards each stable series to the node")
        studies = {name: info.study_instance_uid for name, info in series.items()}
        missing = _wait_for_results(orthanc, node, studies, t0)
        if missing:
            _say(f"results missing for {missing}; node log tail:\n{node.log_tail()}")
            raise typer.Exit(1)
        _print_summary(orthanc, node, series)
        if not exit_:
            _wait_for_interrupt()
