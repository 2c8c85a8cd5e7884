"""`dicom-ai-node pull` and `dicom-ai-node find`: process studies a PACS already holds.

`pull` retrieves in this process by default (C-GET and WADO-RS write into the node's spool + database;
C-MOVE asks the PACS to send to the node's running SCP) and the node's completion sweep then routes the
study as if the PACS had sent it. `--no-wait` queues a `pull` job for the node's workers instead.

`find` prints the PACS's answer as a table for the operator at the server, including patient name and ID:
this table is the only place the node ever shows them (they are not logged, stored or audited).
"""

from __future__ import annotations

import time
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from dicom_ai_node.cli_admin import SOURCE, ConfigOption, _fail, _open_services, cli_actor

if TYPE_CHECKING:
    from dicom_ai_node.node import Services
    from dicom_ai_node.pull.service import PullProgress

_PROGRESS_EVERY_S = 1.0


def _source_names(services: Services) -> str:
    return (
        ", ".join(s.name for s in services.settings.sources) or "none configured (see `sources` in node.yaml)"
    )


def _check_source(services: Services, name: str) -> None:
    if name not in {s.name for s in services.settings.sources}:
        _fail(f"no source named {name!r}; sources: {_source_names(services)}", 2)


def _queue_pull(services: Services, source: str, study: str, series: str | None) -> tuple[int, bool]:
    from dicom_ai_node.domain.jobs import PullRequest
    from dicom_ai_node.persistence.audit import AuditLog

    job_id, new = services.queue.enqueue_pull(PullRequest(source, study, series))
    AuditLog(services.engine).record(
        actor=cli_actor(),
        source=SOURCE,
        action="pull.request",
        target=f"study/{study}",
        detail={"source": source, "series": series, "job_id": job_id, "new": new},
    )
    return job_id, new


def pull_command(
    study: Annotated[str, typer.Option("--study", help="Study Instance UID")],
    source: Annotated[str, typer.Option("--from", help="Source name (node.yaml `sources`)")],
    series: Annotated[str | None, typer.Option("--series", help="Only this Series Instance UID")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait", help="Retrieve here and now, showing progress (default), or queue a pull job"
        ),
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Pull a study (or one series) from a PACS; the node then processes it like a received study."""
    from dicom_ai_node.errors import NodeError
    from dicom_ai_node.pull.service import Puller

    with _open_services(config) as services:
        _check_source(services, source)
        if not wait:
            job_id, new = _queue_pull(services, source, study, series)
            typer.echo(f"pull job {job_id} {'queued' if new else 'already queued or running'}")
            return
        last = 0.0

        def progress(state: PullProgress) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                of = f" of {state.expected}" if state.expected is not None else ""
                typer.echo(
                    f"{state.method}: retrieved {state.retrieved}{of} instances "
                    f"(series {state.series_done} of {state.series_total})",
                    err=True,
                )

        puller = Puller(services.settings, services.spool, services.repo)
        try:
            state = puller.pull(source, study, series, progress)
        except NodeError as exc:
            _fail(str(exc))
    typer.echo(state.summary())


def _parse_date(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    raise typer.BadParameter(f"expected YYYY-MM-DD, got {value!r}", param_hint=option)


def find_command(
    source: Annotated[str, typer.Option("--from", help="Source name (node.yaml `sources`)")],
    patient_id: Annotated[str | None, typer.Option("--patient-id")] = None,
    date_from: Annotated[str | None, typer.Option("--date-from", help="Study date from, YYYY-MM-DD")] = None,
    date_to: Annotated[str | None, typer.Option("--date-to", help="Study date to, YYYY-MM-DD")] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="A modality in the study, e.g. CT")
    ] = None,
    accession: Annotated[str | None, typer.Option("--accession")] = None,
    description: Annotated[
        str | None, typer.Option("--description", help="Study description (wildcards * and ?)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    queue: Annotated[bool, typer.Option("--queue", help="Queue a pull job for every study found")] = False,
    config: ConfigOption = None,
) -> None:
    """Query a PACS for studies (C-FIND / QIDO-RS) and print them; --queue pulls each for processing."""
    from dicom_ai_node.domain.catalog import StudyQuery
    from dicom_ai_node.errors import NodeError
    from dicom_ai_node.persistence.audit import AuditLog
    from dicom_ai_node.pull.query import find_studies

    query = StudyQuery(
        patient_id=patient_id,
        date_from=_parse_date(date_from, "--date-from"),
        date_to=_parse_date(date_to, "--date-to"),
        modality=modality,
        accession_number=accession,
        study_description=description,
        limit=limit,
    )
    if query.date_from and query.date_to and query.date_from > query.date_to:
        raise typer.BadParameter("--date-from is after --date-to")
    with _open_services(config) as services:
        _check_source(services, source)
        settings = services.settings
        try:
            matches = find_studies(settings.source(source), query, settings.ae_title, with_patient=True)
        except NodeError as exc:
            _fail(str(exc))
        # Which filters, never their values (a patient ID is PHI).
        AuditLog(services.engine).record(
            actor=cli_actor(),
            source=SOURCE,
            action="pull.find",
            target=source,
            detail={"filters": query.filter_keys(), "matches": len(matches)},
        )
        typer.echo(
            f"{'DATE':10} {'MOD':8} {'SER':>4} {'INST':>6} {'ACCESSION':16} {'PATIENT ID':16} "
            f"{'PATIENT NAME':24} {'DESCRIPTION':28} STUDY UID"
        )
        for m in matches:
            i = m.info
            typer.echo(
                f"{_date(i.study_date):10} {'/'.join(i.modalities)[:8]:8} {_count(i.number_of_series):>4} "
                f"{_count(i.number_of_instances):>6} {i.accession_number[:16]:16} {m.patient_id[:16]:16} "
                f"{m.patient_name[:24]:24} {i.study_description[:28]:28} {i.study_instance_uid}"
            )
        typer.echo(f"{len(matches)} studies" + (f" (limit {limit} reached)" if len(matches) >= limit else ""))
        if queue:
            for m in matches:
                job_id, new = _queue_pull(services, source, m.info.study_instance_uid, None)
                state = "queued" if new else "already queued or running"
                typer.echo(f"pull job {job_id} {state} for study {m.info.study_instance_uid}")


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def register_pull_commands(app: typer.Typer) -> None:
    app.command("pull")(pull_command)
    app.command("find")(find_command)
