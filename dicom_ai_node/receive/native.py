"""The native receive edge (`dicom.receiver: dcmtk`): the node's settings become the receiver's config
file, the node starts the receiver process, restarts it when it dies, stops it on shutdown, and acts on
its events.

The receiver (native/ainode-storescp, C++ on DCMTK's network library) keeps the rules the Python SCP
keeps on the wire (called AE, calling AE allow-list with IPv4 networks, connection limits and deadlines,
the receive checks with the same statuses) and answers Success only once the instance's file is durable
in the spool's landing dir. Its stdout is a stream of JSON events, its stderr its log:

- `store` {status, bytes, file?, *_uid, calling_ae}: one C-STORE answered -> the node's metrics; with a
  `file`, a durable landed file -> the landing indexer (receive/landing.py) gives it its row;
- `association` {calling_ae, called_ae, address, ending, landed: [{file, *_uid}], statuses, ...}: at
  release/abort -> the "dicom.instances_transferred" audit event, and for peers with
  `series_complete_on_release` the completion signal once its files are indexed;
- `refused` {address, calling_ae, called_ae, reason} -> the coalesced "security.alert" audit event;
- `listening` {port} / `error` {errno, message}: start-up.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.conformance import ACCEPTED_TRANSFER_SYNTAXES, IMAGE_STORAGE_SOP_CLASSES
from dicom_ai_node.errors import ConfigError, DatabaseError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.receive.audit import ACTION_TRANSFERRED, MAX_STUDIES, SecurityAlerts, study_target
from dicom_ai_node.receive.landing import LandedInfo, LandingIndexer
from dicom_ai_node.receive.release import signalling_titles
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

BINARY_ENV = "AINODE_STORESCP"
BINARY_NAME = "ainode-storescp"
# Where scripts/bootstrap.sh builds it (make -C native/ainode-storescp), relative to the checkout.
BUILT_BINARY = Path(__file__).resolve().parents[2] / "build" / BINARY_NAME / BINARY_NAME
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_START_TIMEOUT_S = 15.0
_RESTART_BACKOFF_S = (0.2, 1.0, 5.0)
# A released association's completion signal waits at most this long for its files' rows.
_SIGNAL_WAIT_S = 60.0


def find_binary() -> Path:
    """The receiver binary: $AINODE_STORESCP, the checkout's build, or one on PATH."""
    candidates = [Path(os.environ[BINARY_ENV])] if os.environ.get(BINARY_ENV) else []
    candidates.append(BUILT_BINARY)
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        "dicom.receiver",
        f"receiver dcmtk needs {BINARY_NAME}, which is not built: run scripts/bootstrap.sh "
        f"(or make -C native/{BINARY_NAME}; needs libdcmtk-dev, g++, make)",
    )


def _ipv4_networks(hosts: list[str]) -> list[str] | None:
    """The IPv4 networks of an allow-list entry; None when it names only IPv6 ones (the IPv4-only
    receiver can then never admit it: dropping them would turn the entry into "any address")."""
    networks = [ipaddress.ip_network(host, strict=False) for host in hosts]
    ipv4 = [str(net) for net in networks if net.version == 4]
    if networks and not ipv4:
        return None
    return ipv4


def config_text(settings: NodeSettings, landing: Path, incoming: Path, reuse_port: bool = False) -> str:
    """The receiver's config file: one `key value` per line (native/ainode-storescp/src/config.h)."""
    dicom = settings.dicom
    lines = [
        f"ae_title {settings.ae_title.strip()}",
        f"bind {dicom.bind}",
        f"port {dicom.port}",
        f"max_pdu {dicom.max_pdu}",
        f"accept_any_called_ae {int(dicom.accept_any_called_ae)}",
        f"allow_any_peer {int(dicom.allow_any_peer)}",
        f"max_associations {dicom.max_associations}",
        f"max_associations_per_ip {dicom.max_associations_per_ip}",
        f"max_associations_per_ae {dicom.max_associations_per_ae}",
        f"acse_timeout_s {dicom.acse_timeout_s}",
        f"dimse_timeout_s {dicom.dimse_timeout_s}",
        f"network_timeout_s {dicom.network_timeout_s}",
        f"association_setup_timeout_s {dicom.association_setup_timeout_s}",
        f"pdu_timeout_s {dicom.pdu_timeout_s}",
        f"shutdown_grace_s {getattr(dicom, 'shutdown_grace_s', 10)}",
        f"reserve_bytes {settings.disk_reserve_mb * 1024 * 1024}",
        f"landing_dir {landing}",
        f"incoming_dir {incoming}",
        f"reuse_port {int(reuse_port)}",
    ]
    for peer in dicom.allowed_peers:
        networks = _ipv4_networks(peer.hosts)
        if networks is not None:
            lines.append(" ".join(["peer", str(len(networks)), *networks, peer.ae_title.strip()]))
    lines += [f"sop_class {uid}" for uid in IMAGE_STORAGE_SOP_CLASSES]
    lines += [f"transfer_syntax {uid}" for uid in ACCEPTED_TRANSFER_SYNTAXES]
    return "\n".join(lines) + "\n"


def _landed_info(event: dict[str, Any]) -> LandedInfo | None:
    try:
        return LandedInfo(
            sop_instance_uid=str(event["sop_instance_uid"]),
            sop_class_uid=str(event["sop_class_uid"]),
            series_instance_uid=str(event["series_instance_uid"]),
            study_instance_uid=str(event["study_instance_uid"]),
            transfer_syntax_uid=str(event["transfer_syntax_uid"]),
            calling_ae=str(event["calling_ae"]),
        )
    except KeyError:
        return None  # the file is read again


class NativeReceiver:
    """The running native edge, with StorageSCP's interface: `start()`, `port`, `stop()`."""

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        repo: SeriesRepository,
        metrics: NodeMetrics | None = None,
        audit: AuditLog | None = None,
        on_series_complete: Callable[[], None] | None = None,
        *,
        binary: Path | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.repo = repo
        self.metrics = metrics
        self.audit = audit
        self.alerts = SecurityAlerts(audit) if audit is not None else None
        self.on_series_complete = on_series_complete
        self.binary = binary or find_binary()
        self.reuse_port = reuse_port
        self.indexer = LandingIndexer(spool, repo)
        self.signalling = signalling_titles(settings.dicom.allowed_peers)
        self._workdir = Path(tempfile.mkdtemp(prefix="ainode-storescp-"))
        self._config_path = self._workdir / "receiver.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._start_error: OSError | None = None
        self._supervisor: threading.Thread | None = None
        self._associations: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._association_thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The receiver process's id (None when not running)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Recover landed files, then start the receiver; OSError when it cannot listen."""
        self.indexer.recover()
        self.indexer.start()
        if self.alerts is not None:
            self.alerts.start()
        self._config_path.write_text(
            config_text(self.settings, self.indexer.directory, self.spool.incoming, self.reuse_port)
        )
        self._association_thread = threading.Thread(
            target=self._association_loop, name="native-associations", daemon=True
        )
        self._association_thread.start()
        self._supervisor = threading.Thread(target=self._supervise, name="native-receiver", daemon=True)
        self._supervisor.start()
        if not self._listening.wait(_START_TIMEOUT_S) or self._start_error is not None:
            error = self._start_error or OSError(errno.ETIMEDOUT, "the native receiver did not start")
            self.stop()
            raise error
        log.info(
            "DICOM SCP %s listening on %s:%d (native receiver %s, pid %s)",
            self.settings.ae_title,
            self.settings.dicom.bind,
            self._port,
            self.binary,
            self.pid,
        )

    def stop(self, grace_s: float = 0) -> None:
        """Close the port at once; with `grace_s`, associations in flight may go on for
        `dicom.shutdown_grace_s` (the receiver's config, what the node passes here), then get an
        A-ABORT; without, they end now. A C-STORE in flight always finishes its durable write first."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGQUIT)
            try:
                proc.wait(timeout=grace_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
            self._supervisor = None
        self._associations.put(None)
        if self._association_thread is not None:
            self._association_thread.join(timeout=_SIGNAL_WAIT_S)
            self._association_thread = None
        self.indexer.stop()
        if self.alerts is not None:
            self.alerts.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- the process --------------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Start the receiver, restart it when it dies (until stop). Runs on its own thread for the
        node's life: the receiver gets SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG),
        so a killed node never leaves it holding the port."""
        failures = 0
        while not self._stopping.is_set():
            try:
                proc = subprocess.Popen(
                    [str(self.binary), str(self._config_path), "--parent-pid", str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    close_fds=True,
                )
            except OSError as exc:
                if not self._listening.is_set():
                    self._start_error = exc
                    self._listening.set()
                    return
                log.error("cannot restart the native receiver (retrying): %s", exc)
                self._stopping.wait(_RESTART_BACKOFF_S[-1])
                continue
            self._proc = proc
            assert proc.stdout is not None and proc.stderr is not None
            readers = [
                threading.Thread(
                    target=self._read_events, args=(proc.stdout,), name="native-events", daemon=True
                ),
                threading.Thread(target=self._read_log, args=(proc.stderr,), name="native-log", daemon=True),
            ]
            for reader in readers:
                reader.start()
            started = time.monotonic()
            code = proc.wait()
            if time.monotonic() - started > 60:
                failures = 0  # it ran for a while: back to the shortest restart delay
            for reader in readers:
                reader.join(timeout=5)
            # Its partial files were never acknowledged (the spool's clean_incoming at start does the same).
            for leftover in self.spool.incoming.glob(f"native-{proc.pid}-*.part"):
                leftover.unlink(missing_ok=True)
            if self._stopping.is_set() or self._start_error is not None:
                return
            if not self._listening.is_set():
                self._start_error = OSError(errno.EIO, f"the native receiver exited with {code} at start")
                self._listening.set()
                return
            delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)]
            failures += 1
            self.restarts += 1
            log.error("native receiver exited with %s: restarting in %.1f s", code, delay)
            # Landed files whose events were lost are found by the indexer's rescan.
            self._stopping.wait(delay)

    def _read_log(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            level_name, _, message = line.partition(" ")
            level = _LEVELS.get(level_name)
            if level is None:
                log.warning("%s: %s", BINARY_NAME, line)
            else:
                log.log(level, "%s", message)

    def _read_events(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                event = json.loads(raw)
            except ValueError:
                log.warning("%s: unreadable event line", BINARY_NAME)
                continue
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - one bad event must not stop the event stream
                log.exception("native receiver event %s failed", event.get("event"))

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "store":
            if "file" in event:  # landed (durable): its row comes from the indexer
                self.indexer.enqueue(str(event["file"]), _landed_info(event))
            if self.metrics is not None:
                self.metrics.observe_store(int(event["status"]), int(event.get("bytes", 0)))
        elif kind == "association":
            self._associations.put(event)
        elif kind == "refused":
            if self.alerts is not None:
                self.alerts.note(
                    str(event.get("address", "")),
                    str(event.get("calling_ae", "")),
                    str(event.get("called_ae", "")),
                    str(event.get("reason", "")),
                )
        elif kind == "listening":
            self._port = int(event["port"])
            self._listening.set()
        elif kind == "error":
            if not self._listening.is_set():
                code = int(event.get("errno", errno.EIO))
                self._start_error = OSError(code, str(event.get("message", os.strerror(code))))
                self._listening.set()

    # -- association records ------------------------------------------------------------------------
    def _association_loop(self) -> None:
        while True:
            event = self._associations.get()
            if event is None:
                return
            try:
                self._on_association(event)
            except Exception:  # noqa: BLE001 - an audit or signal failure must not stop the next ones
                log.exception("association record failed")

    def _on_association(self, event: dict[str, Any]) -> None:
        """The association's transfer audit event and, for a released one from a signalling peer, its
        series complete (once its files have their rows: the completion sweep must find them)."""
        landed: list[dict[str, str]] = list(event.get("landed", []))
        calling = str(event.get("calling_ae", ""))
        ending = str(event.get("ending", "closed"))
        studies = list(dict.fromkeys(item["study_instance_uid"] for item in landed))
        if self.audit is not None:
            failed = int(event.get("failed", 0))
            shown = studies[:MAX_STUDIES]
            self.audit.record_quietly(
                actor=calling,
                source=str(event.get("address", "")),
                action=ACTION_TRANSFERRED,
                target=study_target(shown, len(studies) > MAX_STUDIES),
                outcome="failed" if failed or ending != "released" else "ok",
                detail={
                    "role": "destination",
                    "via": "C-STORE",
                    "receiver": "dcmtk",
                    "calling_ae": calling,
                    "called_ae": str(event.get("called_ae", "")),
                    "instances": int(event.get("stored", 0)) + failed,
                    # Duplicates are found when indexed, after this record: counted as stored here.
                    "stored": int(event.get("stored", 0)),
                    "failed": failed,
                    "statuses": dict(sorted(event.get("statuses", {}).items())),
                    "studies": shown,
                    "studies_truncated": len(studies) > MAX_STUDIES,
                    "bytes": int(event.get("bytes", 0)),
                    "association": ending,
                },
            )
        if ending != "released" or calling not in self.signalling or not landed:
            return
        if not self.indexer.wait_indexed([item["file"] for item in landed], _SIGNAL_WAIT_S):
            log.warning(
                "association from %s released: its files are not indexed yet, quiet period applies", calling
            )
            return
        series = list(dict.fromkeys(item["series_instance_uid"] for item in landed))
        try:
            signalled = self.repo.signal_series_complete(series)
        except DatabaseError as exc:
            log.warning(
                "completion signal of %d series not recorded (quiet period applies): %s", len(series), exc
            )
            return
        log.info("association from %s released: %d of %d series complete", calling, signalled, len(series))
        if signalled and self.on_series_complete is not None:
            self.on_series_complete()
