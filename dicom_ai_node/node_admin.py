"""Builds what the admin API is given (api.context.AdminContext) from the node's services.

The api package imports domain + persistence only (DESIGN.md); destination probes, model manifests and
readiness checks need deliver/ and infer/, so they are composed here and handed in as callables.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_ai_node.api.context import AdminContext
from dicom_ai_node.config import Destination, HttpSettings, NodeSettings
from dicom_ai_node.deliver.registry import deliverer_for
from dicom_ai_node.domain.catalog import (
    AuthSettings,
    CheckResult,
    DestinationInfo,
    ModelInfo,
    ProbeResult,
    WeightsInfo,
)
from dicom_ai_node.domain.ingest import StowLimits
from dicom_ai_node.errors import NodeError
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.infer.manifest import ModelManifest, sha256_of
from dicom_ai_node.infer.registry import BUILTIN_MODELS_DIR, ModelRegistry
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.persistence.rules_store import RuleStore
from dicom_ai_node.pull.catalog import source_info, study_finder
from dicom_ai_node.receive.ingest import stow_ingest
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

# Options shown in the page; nothing secret is configured on destinations today, but list what is shown
# rather than dumping the model, so a future credential field does not leak by default.
_SHOWN_OPTIONS = (
    "calling_ae_title",
    "timeout_s",
    "verify",
    "seg_format",
    "seg_omit_empty_frames",
    "key_images",
    "max_pdu",
)


def destination_info(dest: Destination) -> DestinationInfo:
    address = dest.url or "" if dest.type == "dicomweb" else f"{dest.ae_title}@{dest.host}:{dest.port}"
    options = {key: getattr(dest, key) for key in _SHOWN_OPTIONS}
    return DestinationInfo(name=dest.name, type=dest.type, address=address, options=options)


def destination_prober(settings: NodeSettings) -> Callable[[str], ProbeResult]:
    """C-ECHO (DIMSE) or one QIDO-RS query (DICOMweb) to a configured destination, by name."""

    def probe(name: str) -> ProbeResult:
        dest = settings.destination(name)
        t0 = time.perf_counter()
        try:
            detail = deliverer_for(dest, settings.ae_title).probe()
        except NodeError as exc:
            return ProbeResult(ok=False, detail=str(exc), elapsed_s=time.perf_counter() - t0)
        return ProbeResult(ok=True, detail=detail, elapsed_s=time.perf_counter() - t0)

    return probe


class ModelCatalog:
    """Model manifests as the page lists them, each weights file checked against its sha256 once.

    Hashing reads every weights file (tens of MB), so results are kept per (model, version, file).
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._verified: dict[tuple[str, str, str], bool] = {}
        self._lock = threading.Lock()

    def __call__(self) -> list[ModelInfo]:
        return [self._info(m) for m in self._registry.manifests()]

    def _info(self, m: ModelManifest) -> ModelInfo:
        builtin = m.directory is not None and m.directory.parent == BUILTIN_MODELS_DIR
        return ModelInfo(
            name=m.name,
            version=m.version,
            task=m.task,
            format=m.format,
            modalities=list(m.accepts.modalities),
            body_parts=list(m.accepts.body_parts),
            licence=m.licence,
            provenance=m.training_data,
            intended_use=m.intended_use,
            limits=m.limits or "",
            source="built-in" if builtin else str(m.directory or ""),
            weights=[
                WeightsInfo(file=w.file, sha256=w.sha256, verified=self._check(m, w.file, w.sha256))
                for w in m.weights
            ],
        )

    def _check(self, m: ModelManifest, file: str, sha256: str) -> bool:
        key = (m.name, m.version, file)
        with self._lock:
            if key not in self._verified:
                path = next(m.weights_path(w) for w in m.weights if w.file == file)
                self._verified[key] = path.is_file() and sha256_of(path) == sha256
            return self._verified[key]


def readiness_checks(
    queue: JobQueue,
    spool: Spool,
    reserve_bytes: int,
    inference: InferenceHost | None,
    worker_threads: Callable[[], Sequence[threading.Thread]],
) -> Callable[[], dict[str, CheckResult]]:
    """/readyz: the database answers, the spool takes a durable write, the inference side is alive."""

    def check() -> dict[str, CheckResult]:
        return {
            "database": _database(queue),
            "spool": _spool(spool.incoming, spool.free_bytes, reserve_bytes),
            "inference": _inference(inference, worker_threads()),
        }

    return check


def _database(queue: JobQueue) -> CheckResult:
    try:
        queue.counts()
    except Exception as exc:  # noqa: BLE001 - any failure to answer means "not ready"; the type says why
        return CheckResult(ok=False, detail=f"database unavailable: {type(exc).__name__}")
    return CheckResult(ok=True, detail="answers")


def _spool(incoming: Path, free_bytes: Callable[[], int], reserve_bytes: int) -> CheckResult:
    # Unique across pods sharing the spool: each container's node is pid 1 there, and threads' idents repeat.
    probe = incoming / f".readyz-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
        free = free_bytes()
    except OSError as exc:
        return CheckResult(ok=False, detail=f"spool not writable: {exc.strerror or exc}")
    if free < reserve_bytes:
        return CheckResult(
            ok=False, detail=f"{free // 2**20} MiB free, under the {reserve_bytes // 2**20} MiB reserve"
        )
    return CheckResult(ok=True, detail=f"writable, {free // 2**20} MiB free")


def _inference(inference: InferenceHost | None, threads: Sequence[threading.Thread]) -> CheckResult:
    if inference is None:
        return CheckResult(ok=True, detail="no workers in this process (separate worker processes)")
    dead = [t.name for t in threads if not t.is_alive()]
    if dead:
        return CheckResult(ok=False, detail=f"worker threads stopped: {', '.join(dead)}")
    if inference.timeout_s == 0:
        return CheckResult(ok=True, detail="models run in the worker process (no inference timeout)")
    pid = inference.child_pid
    if pid is None:
        return CheckResult(ok=True, detail="inference process starts with the first job")
    return CheckResult(ok=True, detail=f"inference process {pid} running")


def insecure_http_warning(http: HttpSettings) -> str | None:
    """The warning `serve` logs when the admin page is reachable from the network without TLS."""
    if http.tls or http.is_loopback():
        return None
    return (
        f"admin HTTP bound to {http.bind} without TLS: passwords, session cookies and API tokens cross the "
        "network in clear text; set http.tls_cert and http.tls_key"
    )


def auth_settings(settings: NodeSettings) -> AuthSettings:
    http = settings.http
    return AuthSettings(
        idle_s=http.session_idle_minutes * 60,
        max_age_s=http.session_max_hours * 3600,
        secure_cookie=http.tls,
        login_max_failures=http.login_max_failures,
        login_window_s=http.login_window_minutes * 60,
        metrics_allowed_networks=tuple(http.metrics_allowed_networks),
        allowed_hosts=http.effective_allowed_hosts(),
    )


def build_admin_context(
    settings: NodeSettings,
    *,
    repo: SeriesRepository,
    queue: JobQueue,
    rules: RuleStore,
    accounts: AccountRepository,
    audit: AuditLog,
    registry: ModelRegistry,
    readiness: Callable[[], dict[str, CheckResult]],
    metrics: NodeMetrics | None,
    version: str,
    dicom_port: int,
    spool: Spool | None = None,
) -> AdminContext:
    """`spool` turns STOW-RS receive on (unless dicomweb.stow_enabled is false): parts stream into its
    incoming dir and are stored through the same ingest path as C-STORE."""
    stow_spool = spool if settings.dicomweb.stow_enabled else None
    return AdminContext(
        repo=repo,
        queue=queue,
        rules=rules,
        accounts=accounts,
        audit=audit,
        destinations=[destination_info(d) for d in settings.destinations],
        probe_destination=destination_prober(settings),
        models=ModelCatalog(registry),
        readiness=readiness,
        metrics=metrics,
        auth=auth_settings(settings),
        version=version,
        ae_title=settings.ae_title,
        dicom_port=dicom_port,
        ingest=(
            stow_ingest(stow_spool, repo, settings.disk_reserve_mb * 2**20, metrics) if stow_spool else None
        ),
        incoming_dir=stow_spool.incoming if stow_spool else None,
        stow_limits=StowLimits(
            max_request_bytes=settings.dicomweb.stow_max_request_mb * 2**20,
            max_part_bytes=settings.dicomweb.stow_max_part_mb * 2**20,
        ),
        sources=[source_info(s) for s in settings.sources],
        find_studies=study_finder(settings),
    )
