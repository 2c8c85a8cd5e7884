"""The `dicom-ai-node` command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from dicom_ai_node import __version__
from dicom_ai_node.cli_admin import register_rules_commands, tokens_app, users_app
from dicom_ai_node.cli_db import db_app
from dicom_ai_node.cli_demo import demo_command
from dicom_ai_node.cli_pull import register_pull_commands
from dicom_ai_node.config import NodeSettings, load_settings
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import PayloadError
from dicom_ai_node.errors import ConfigError, DeliveryError, InvalidDicomError, RuleError
from dicom_ai_node.evaluate.cli import evaluate_command
from dicom_ai_node.training.cli import train_app

if TYPE_CHECKING:
    from dicom_ai_node.infer.registry import ModelRegistry
    from dicom_ai_node.node import Services

app = typer.Typer(help="PACS-integrated DICOM AI node.", no_args_is_help=True, add_completion=False)
rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)
jobs_app = typer.Typer(help="The job queue.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(train_app, name="train")
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
register_rules_commands(rules_app)
register_pull_commands(app)
app.command("evaluate")(evaluate_command)
app.command("demo")(demo_command)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="node.yaml (default: $AINODE_CONFIG or config/node.yaml if present)"),
]

log = logging.getLogger("dicom_ai_node")


def _settings(config: Path | None) -> NodeSettings:
    import os

    path = config or (Path(os.environ["AINODE_CONFIG"]) if os.environ.get("AINODE_CONFIG") else None)
    if path is None and Path("config/node.yaml").exists():
        path = Path("config/node.yaml")
    try:
        return load_settings(path, base_dir=Path.cwd())
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # highdicom logs every copied module at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # dicomweb-client logs request URLs at DEBUG, and a QIDO-RS query URL may hold a patient ID filter.
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


def _parse_peer(value: str) -> tuple[str, str, int]:
    try:
        ae_title, rest = value.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return ae_title, host, int(port)
    except ValueError as exc:
        raise typer.BadParameter(f"expected AET@HOST:PORT, got {value!r}") from exc


# SIGTERM: how long worker threads may go on finishing a job (a delivery, an encoding) before their jobs
# are released back to the queue; a running inference is killed at once instead.
_WORKER_STOP_S = 10.0


def _wait_for_signal() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command()
def serve(
    config: ConfigOption = None,
    http: Annotated[bool, typer.Option(help="Serve the admin web page and API")] = True,
    workers: Annotated[bool, typer.Option(help="Run infer + deliver workers in this process")] = True,
) -> None:
    """Embedded node: DICOM SCP + completion sweeps + workers + admin HTTP, in one process."""
    from dicom_ai_node.api.app import create_app
    from dicom_ai_node.api.server import start_http
    from dicom_ai_node.infer.host import InferenceHost
    from dicom_ai_node.metrics import NodeMetrics
    from dicom_ai_node.node import (
        build_receiver,
        build_scheduler,
        build_workers,
        seed_rules,
        start_worker_threads,
        stop_workers,
    )
    from dicom_ai_node.node_admin import build_admin_context, insecure_http_warning, readiness_checks
    from dicom_ai_node.persistence.accounts import AccountRepository
    from dicom_ai_node.persistence.audit import AuditLog
    from dicom_ai_node.route.completion import SweepTrigger

    settings = _settings(config)
    _setup_logging(settings.log_level)
    services = _node_services(settings)
    try:
        seed_rules(services)
    except RuleError as exc:
        log.error("rules file not seeded: %s", exc)
    dropped = services.spool.clean_incoming()
    if dropped:
        log.info("removed %d unacknowledged partial files from the spool", dropped)
    # A kill between a file's rename into the spool and its row's commit leaves a file no row names.
    orphans = services.spool.remove_orphans(
        services.repo.instance_spool_paths, services.repo.has_instance_file
    )
    if orphans:
        log.info("removed %d unacknowledged spool files that no instance row names", orphans)
    stop = _wait_for_signal()
    metrics = NodeMetrics(job_counts=services.queue.counts, queue_stats=services.queue.stats)
    inference = InferenceHost.from_settings(settings.models) if workers else None
    threads: list[threading.Thread] = []

    # Bind both listeners first: a busy port is one clear line and exit 1, not a half-started node.
    audit = AuditLog(services.engine)
    # A release from a peer with series_complete_on_release kicks the completion sweep at once.
    sweep_now = SweepTrigger()
    try:
        # dicom.receiver: the in-process SCP, or the native receiver this node starts and supervises.
        scp = build_receiver(settings, services, metrics, audit, on_series_complete=sweep_now.kick)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        scp.start()
    except OSError as exc:
        _fail_listen("DICOM", settings.dicom.bind, settings.dicom.port, exc)
    server = None
    if http:
        warning = insecure_http_warning(settings.http)
        if warning:
            log.warning(warning)
        readiness = readiness_checks(
            services.queue,
            services.spool,
            settings.disk_reserve_mb * 1024 * 1024,
            inference,
            lambda: threads,
        )
        ctx = build_admin_context(
            settings,
            repo=services.repo,
            queue=services.queue,
            rules=services.rules,
            accounts=AccountRepository(services.engine),
            audit=audit,
            registry=services.registry,
            readiness=readiness,
            metrics=metrics,
            version=__version__,
            dicom_port=scp.port,
            spool=services.spool,
        )
        try:
            server = start_http(
                create_app(ctx),
                settings.http.bind,
                settings.http.port,
                tls_cert=settings.http.tls_cert,
                tls_key=settings.http.tls_key,
            )
        except OSError as exc:
            scp.stop()
            _fail_listen("HTTP", settings.http.bind, settings.http.port, exc)

    scheduler = build_scheduler(services, sweep_now=sweep_now)
    scheduler.start()
    node_workers = []
    if workers:
        node_workers = build_workers(
            services, list(JobKind), inference=inference, metrics=metrics, audit=audit
        )
        threads.extend(start_worker_threads(node_workers, stop))
    scheme = "https" if settings.http.tls else "http"
    log.info(
        "dicom-ai-node %s: AE %s on %s:%d, admin %s://%s:%d/",
        __version__,
        settings.ae_title,
        settings.dicom.bind,
        scp.port,
        scheme,
        settings.http.bind,
        settings.http.port,
    )
    stop.wait()
    stopping_since = time.monotonic()
    if inference is not None:
        inference.interrupt()  # a model running now is killed: its worker releases the job at once
    # The port closes now; associations in flight may finish within the grace, then get an A-ABORT.
    scp.stop(settings.dicom.shutdown_grace_s)
    scheduler.shutdown(wait=False)
    sweep_now.stop()
    if server is not None:
        server.should_exit = True
    # The workers have been stopping meanwhile: what is left of their time, counted from the signal.
    stop_workers(node_workers, threads, inference, _WORKER_STOP_S - (time.monotonic() - stopping_since))
    log.info("stopped")


def _node_services(settings: NodeSettings) -> Services:
    """serve/worker: bring the schema up to date (auto_upgrade_schema) or refuse with one line."""
    from dicom_ai_node.node import build_services
    from dicom_ai_node.persistence.db import SchemaOutOfDateError

    try:
        return build_services(settings, migrate="upgrade" if settings.auto_upgrade_schema else "check")
    except SchemaOutOfDateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _read_services(config: Path | None) -> Services:
    """Read-only commands: never create or alter the database; one line when it is missing or behind."""
    from dicom_ai_node.node import build_services
    from dicom_ai_node.persistence.db import SchemaOutOfDateError

    try:
        return build_services(_settings(config), migrate="check")
    except SchemaOutOfDateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _fail_listen(what: str, host: str, port: int, exc: OSError) -> NoReturn:
    typer.echo(f"error: cannot listen for {what} on {host}:{port}: {exc.strerror or exc}", err=True)
    raise typer.Exit(1) from exc


@app.command()
def worker(
    config: ConfigOption = None,
    kind: Annotated[list[JobKind] | None, typer.Option(help="Job kinds to run (default: all)")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics for this process on METRICS_BIND:PORT")
    ] = None,
    metrics_bind: Annotated[
        str, typer.Option(help="Address for --metrics-port (0.0.0.0 in a container: Prometheus, probes)")
    ] = "127.0.0.1",
) -> None:
    """A separate worker process (scale-out: one per GPU) against the shared database and spool."""
    from dicom_ai_node.infer.host import InferenceHost
    from dicom_ai_node.metrics import NodeMetrics, start_metrics_server
    from dicom_ai_node.node import build_scheduler, build_workers, start_worker_threads, stop_workers

    settings = _settings(config)
    _setup_logging(settings.log_level)
    services = _node_services(settings)
    stop = _wait_for_signal()
    metrics = NodeMetrics(job_counts=services.queue.counts, queue_stats=services.queue.stats)
    if metrics_port is not None:
        try:
            start_metrics_server(metrics, metrics_bind, metrics_port)
        except OSError as exc:
            _fail_listen("metrics", metrics_bind, metrics_port, exc)
    scheduler = build_scheduler(services, completion_sweep=False)
    scheduler.start()
    inference = InferenceHost.from_settings(settings.models)
    node_workers = build_workers(services, kind or list(JobKind), inference=inference, metrics=metrics)
    threads = start_worker_threads(node_workers, stop)
    stop.wait()
    scheduler.shutdown(wait=False)
    stop_workers(node_workers, threads, inference, _WORKER_STOP_S)


def _collect_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            files.append(p)
    return files


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders")],
    to: Annotated[str, typer.Option("--to", help="AET@HOST:PORT of the receiver")],
    calling_aet: Annotated[str, typer.Option(help="Our calling AE title")] = "AINODE",
) -> None:
    """C-STORE files to a DICOM peer (with a progress bar)."""
    from dicom_ai_node.deliver.dimse import DicomPeer, send_files

    ae_title, host, port = _parse_peer(to)
    files = _collect_files(paths)
    if not files:
        typer.echo("error: no files to send", err=True)
        raise typer.Exit(2)
    with typer.progressbar(length=len(files), label=f"C-STORE to {ae_title}") as bar:
        try:
            report = send_files(
                files, DicomPeer(ae_title, host, port, calling_aet), lambda _p, _n: bar.update(1)
            )
        except (DeliveryError, InvalidDicomError) as exc:
            typer.echo(f"\nerror: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(f"sent {len(report.sent)} instances ({len(report.warnings)} with warnings)")


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="AET@HOST:PORT")],
    calling_aet: Annotated[str, typer.Option(help="Our calling AE title")] = "AINODE",
) -> None:
    """C-ECHO a DICOM peer."""
    from dicom_ai_node.deliver.dimse import DicomPeer
    from dicom_ai_node.deliver.dimse import echo as c_echo

    ae_title, host, port = _parse_peer(peer)
    try:
        status = c_echo(DicomPeer(ae_title, host, port, calling_aet))
    except DeliveryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"C-ECHO {ae_title}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@rules_app.command("validate")
def rules_validate(
    file: Annotated[Path, typer.Argument(help="rules.yaml to check")],
    config: ConfigOption = None,
) -> None:
    """Check a rules file: syntax, operators, regexes, and that models and destinations exist."""
    from dicom_ai_node.rules_file import load_rules

    settings = _settings(config)
    try:
        ruleset = load_rules(file)
    except RuleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    problems = ruleset.check_references(_registry(config).names(), [d.name for d in settings.destinations])
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{file}: {len(ruleset.rules)} rules OK")


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    status: Annotated[JobStatus | None, typer.Option()] = None,
    kind: Annotated[JobKind | None, typer.Option()] = None,
    limit: int = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    services = _read_services(config)
    jobs = services.queue.list_jobs(status=status, kind=kind, limit=limit)
    if as_json:
        typer.echo(json.dumps([_job_json(j) for j in jobs], indent=2))
        return
    typer.echo(f"{'ID':>6} {'KIND':8} {'STATUS':10} {'ATT':>5} {'UPDATED':20} DETAIL")
    for j in jobs:
        detail = j.last_error or j.payload.get("model") or j.payload.get("destination") or ""
        typer.echo(
            f"{j.id:>6} {j.kind.value:8} {j.status.value:10} {j.attempts:>2}/{j.max_attempts:<2} "
            f"{j.updated_at:%Y-%m-%d %H:%M:%S}  {str(detail)[:80]}"
        )


def _job_json(j: object) -> dict[str, object]:
    from dataclasses import asdict

    data = asdict(j)  # type: ignore[call-overload]
    return {
        k: (v.isoformat() if hasattr(v, "isoformat") else getattr(v, "value", v)) for k, v in data.items()
    }


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: ConfigOption = None) -> None:
    """Re-queue a dead or failed job (dead-letter replay)."""
    services = _read_services(config)
    if not services.queue.retry(job_id):
        typer.echo(f"error: job {job_id} is not dead or failed (or does not exist)", err=True)
        raise typer.Exit(1)
    typer.echo(f"job {job_id} re-queued")


@jobs_app.command("rerun")
def jobs_rerun(job_id: int, config: ConfigOption = None) -> None:
    """Run a finished job again (same UIDs: its results replace, not duplicate, in the PACS)."""
    services = _read_services(config)
    try:
        new_id = services.queue.rerun(job_id)
    except PayloadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if new_id is None:
        typer.echo(f"error: job {job_id} has not finished (or does not exist)", err=True)
        raise typer.Exit(1)
    typer.echo(f"job {job_id} re-run as job {new_id}")


def _registry(config: Path | None) -> ModelRegistry:
    from dicom_ai_node.infer.registry import default_registry

    settings = _settings(config)
    try:
        return default_registry(settings.models.device, settings.models.paths)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@models_app.command("list")
def models_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Built-in and user models (from models.paths), one line each."""
    from dicom_ai_node.infer.registry import BUILTIN_MODELS_DIR

    manifests = _registry(config).manifests()
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
        return
    typer.echo(f"{'NAME':22} {'VERSION':10} {'TASK':15} {'FORMAT':13} {'MODALITIES':12} SOURCE")
    for m in manifests:
        source = "built-in" if m.directory and m.directory.parent == BUILTIN_MODELS_DIR else str(m.directory)
        typer.echo(
            f"{m.name:22} {m.version:10} {m.task:15} {m.format:13} {','.join(m.accepts.modalities):12} {source}"
        )


@models_app.command("show")
def models_show(name: str, config: ConfigOption = None) -> None:
    """Everything the manifest says about one model: input, outputs, weights, licence, provenance."""
    from dicom_ai_node.errors import ModelNotFoundError

    try:
        m = _registry(config).manifest(name)
    except ModelNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    spec = m.input
    lines = [
        f"{m.name} {m.version} ({m.task}, {m.format})",
        f"  {m.description}",
        f"directory:     {m.directory}",
        f"accepts:       modalities {', '.join(m.accepts.modalities)}"
        + (f"; body parts {', '.join(m.accepts.body_parts)}" if m.accepts.body_parts else ""),
        f"input:         orientation {spec.orientation}, spacing {spec.spacing_mm or 'source'} mm"
        + (f", size {spec.size}" if spec.size else "")
        + f", window {spec.intensity.window or 'auto'}, normalise {spec.intensity.normalise}",
    ]
    if m.inference.roi_size:
        lines.append(f"inference:     sliding window {m.inference.roi_size}, overlap {m.inference.overlap}")
    for seg in m.outputs.segments:
        lines.append(
            f"segment {seg.value}:     {seg.label} ({seg.type.scheme} {seg.type.value} {seg.type.meaning}), "
            f"colour {seg.colour}"
        )
    for f in m.outputs.findings:
        lines.append(
            f"finding {f.index}:     {f.finding.meaning} ({f.finding.scheme} {f.finding.value}), "
            f"present at probability >= {f.threshold}"
        )
    for w in m.weights:
        lines.append(f"weights:       {w.file} sha256 {w.sha256}")
    lines += [
        f"licence:       {m.licence}",
        f"training data: {m.training_data}",
        f"intended use:  {m.intended_use}",
    ]
    if m.limits:
        lines.append(f"limits:        {m.limits}")
    typer.echo("\n".join(lines))


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="models to verify (default: all)")] = None,
    config: ConfigOption = None,
    load: Annotated[
        bool, typer.Option("--load", help="also load each model (weights into the network)")
    ] = False,
) -> None:
    """Check each model's weights against the manifest's sha256 (and with --load, that it loads)."""
    from dicom_ai_node.infer.manifest import verify_weights

    registry = _registry(config)
    selected = names or registry.names()
    failed = 0
    for name in selected:
        try:
            manifest = registry.manifest(name)
            if manifest.format == "monai-bundle":
                from dicom_ai_node.infer.bundle_manifest import verify_bundle

                problems = verify_bundle(manifest)
            else:
                problems = verify_weights(manifest)
            if not problems and load:
                registry.get(name)
        except Exception as exc:  # noqa: BLE001 - report every model, then fail the command
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:
            failed += 1
            typer.echo(f"FAIL {name}: " + "; ".join(problems))
        else:
            checked = (
                f"{len(manifest.weights)} weights file(s) match sha256" if manifest.weights else "no weights"
            )
            typer.echo(f"OK   {name} {manifest.version}: {checked}" + (", loaded" if load else ""))
    if failed:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    typer.echo(__version__)


if __name__ == "__main__":
    app()
