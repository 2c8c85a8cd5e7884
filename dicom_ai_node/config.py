"""Node configuration: a YAML file (config/node.yaml) with environment-variable overrides.

Environment variables use the prefix ``AINODE_`` and ``__`` between nesting levels, e.g.
``AINODE_DATABASE_URL=postgresql://...`` or ``AINODE_DICOM__PORT=11113``. Environment wins over the file.
Invalid values raise `ConfigError` naming the key (``dicom.port``), so the CLI can print one clear line.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# The peers are domain types (the stages use them without the settings module); re-exported here.
from dicom_ai_node.domain.peers import AllowedPeer as AllowedPeer
from dicom_ai_node.domain.peers import Destination as Destination
from dicom_ai_node.domain.peers import Source as Source
from dicom_ai_node.domain.peers import check_ae_title
from dicom_ai_node.domain.results import OutputIdentity
from dicom_ai_node.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DicomTlsSettings(_Strict):
    """DICOM TLS on the SCP (PS3.15 B.9, BCP 195): when set, `dicom.port` speaks TLS only.

    `ca` is the bundle client certificates must chain to; with `require_client_cert` (the default) a
    peer without such a certificate fails the handshake, before any DICOM byte is read.
    """

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = True
    # A TCP connection that has not finished the TLS handshake after this long is closed.
    handshake_timeout_s: float = Field(10, gt=0)

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> DicomTlsSettings:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca (the bundle client certificates chain to)")
        return self


class DicomSettings(_Strict):
    bind: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    # 128 KiB PDUs receive 17-40 % faster than pynetdicom's 16 KiB default.
    max_pdu: int = Field(131072, ge=0)
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    # The allow-list is on by default; an admin must opt out explicitly.
    allow_any_peer: bool = False
    # Associations called to another AE title than `ae_title` are rejected (A-ASSOCIATE-RJ, called AE
    # title not recognised); true accepts any called AE title, for a PACS configured with a wrong one.
    accept_any_called_ae: bool = False
    acse_timeout_s: float = 30
    dimse_timeout_s: float = 60
    network_timeout_s: float = 60
    # Denial of service (docs/reliability.md, "Denial of service"): open connections in total, per peer
    # IP (refused at TCP accept, before any thread) and per calling AE (A-ASSOCIATE-RJ 2/3/2); a connection
    # without A-ASSOCIATE-AC/RJ this long after the TCP accept, or whose PDU is still incomplete this long
    # after its header began, is closed.
    max_associations: int = Field(32, ge=1)
    max_associations_per_ip: int = Field(8, ge=1)
    max_associations_per_ae: int = Field(8, ge=1)
    association_setup_timeout_s: float = Field(10, gt=0)
    pdu_timeout_s: float = Field(30, gt=0)
    # On SIGTERM the port closes at once; associations in flight may go on this long, then get an A-ABORT
    # (keep it below the orchestrator's stop timeout, e.g. Kubernetes' 30 s terminationGracePeriodSeconds).
    shutdown_grace_s: float = Field(10, ge=0)
    # DICOM TLS (docs/operations.md, "DICOM TLS"): the port then refuses plain TCP.
    tls: DicomTlsSettings | None = None
    # The C-STORE edge: "pynetdicom" (in the node's process) or "dcmtk", the native receiver
    # (native/ainode-storescp, built by scripts/bootstrap.sh; docs/performance.md, "Ingest"): same access
    # rules and receive checks, 5-8x the throughput with fsync on; no DICOM TLS, IPv4 only.
    receiver: Literal["pynetdicom", "dcmtk"] = "pynetdicom"

    @model_validator(mode="after")
    def _native_receiver_limits(self) -> DicomSettings:
        if self.receiver == "dcmtk" and self.tls is not None:
            raise ValueError(
                "receiver dcmtk does not support DICOM TLS: remove tls or set receiver: pynetdicom"
            )
        if self.receiver == "dcmtk" and ":" in self.bind:
            raise ValueError(
                "receiver dcmtk listens on IPv4 only: bind an IPv4 address or set receiver: pynetdicom"
            )
        return self

    @model_validator(mode="after")
    def _certificate_binding_needs_tls(self) -> DicomSettings:
        for i, peer in enumerate(self.allowed_peers):
            if peer.binds_certificate and self.tls is None:
                raise ValueError(
                    f"allowed_peers.{i} binds a TLS certificate (tls_subject/tls_fingerprint): set tls"
                )
        return self


# The admin page answers only requests whose Host header names one of these (DNS rebinding defence);
# the bind address is added when it is a specific one.
DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")
_HOST_NAME = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+)$")


class HttpSettings(_Strict):
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # HTTPS for the admin page and API: PEM certificate (chain) and private key. Without them the node
    # serves plain HTTP and warns at start when bound to anything but loopback.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Sign-in sessions end after this long without a request, and after session_max_hours in any case.
    session_idle_minutes: float = Field(30, gt=0)
    session_max_hours: float = Field(12, gt=0)
    # More failed sign-ins than this for one user name within the window (or 3x from one address)
    # locks sign-in for that name (address) until the window has passed.
    login_max_failures: int = Field(5, ge=1)
    login_window_minutes: float = Field(15, gt=0)
    # /metrics answers these client networks without sign-in (a Prometheus on the same host);
    # others need an API token.
    metrics_allowed_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Host names (without port) the admin page and API answer to; list every name admins browse to.
    # Others get 400 "host not allowed" (DNS rebinding), except /healthz and /readyz. "*" allows any.
    allowed_hosts: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS))

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST_NAME.match(host):
                raise ValueError(f"not a host name or IP address (no scheme, no port): {host!r}")
        return [h.lower() for h in hosts]

    @field_validator("metrics_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for net in networks:
            ipaddress.ip_network(net, strict=False)  # raises ValueError with the bad value
        return networks

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def effective_allowed_hosts(self) -> tuple[str, ...]:
        """`allowed_hosts` plus the bind address when it is a specific one."""
        hosts = list(self.allowed_hosts)
        if self.bind not in ("0.0.0.0", "::", "") and self.bind.lower() not in hosts:
            hosts.append(self.bind.lower())
        return tuple(hosts)

    def is_loopback(self) -> bool:
        if self.bind == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return False


class DicomWebSettings(_Strict):
    """STOW-RS receive on the admin HTTP port (POST /dicom-web/studies), for senders with an API token."""

    stow_enabled: bool = True
    # A request over stow_max_request_mb, or one part over stow_max_part_mb, is refused with 413 and
    # nothing of it is stored. The body streams to the spool, so these bound disk use, not memory.
    stow_max_request_mb: int = Field(2048, ge=1)
    stow_max_part_mb: int = Field(1024, ge=1)


class WorkerSettings(_Strict):
    lease_s: float = Field(120, gt=0)
    heartbeat_s: float = Field(10, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(8, ge=1)
    backoff_base_s: float = Field(5, gt=0)
    backoff_cap_s: float = Field(600, gt=0)
    kinds: list[Literal["infer", "deliver"]] = Field(default_factory=lambda: ["infer", "deliver"])  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _lease_longer_than_heartbeat(self) -> WorkerSettings:
        if self.lease_s <= 2 * self.heartbeat_s:
            raise ValueError("lease_s must be more than twice heartbeat_s")
        return self


class ModelSettings(_Strict):
    # auto: CUDA when a usable GPU is present, else CPU; "cuda" without a GPU falls back to CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # User model directories: each a model directory (manifest.yaml or a MONAI bundle) or a folder of them.
    paths: list[Path] = Field(default_factory=list)
    # Hard limit per inference: a model still running after this is killed (its process is restarted)
    # and the job fails; 0 runs models in the worker process itself, without a limit.
    inference_timeout_s: float = Field(900, ge=0)


class RetentionSettings(_Strict):
    # The node is not an archive: the PACS holds the images and the results. After `days` without a new
    # instance, a finished series' images and results leave the spool (its rows stay, without PHI, as
    # the job history). 0 keeps everything for ever.
    days: float = Field(7, ge=0)
    # A series with a dead-letter job is kept this long instead (an admin may still replay the job).
    dead_days: float = Field(30, ge=0)
    interval_s: float = Field(3600, gt=0)

    @model_validator(mode="after")
    def _dead_kept_at_least_as_long(self) -> RetentionSettings:
        if self.days and self.dead_days < self.days:
            raise ValueError("dead_days must be at least days")
        return self


class IdentitySettings(_Strict):
    manufacturer: str = "dicom-ai-node project"
    manufacturer_model_name: str = "dicom-ai-node"
    device_serial_number: str = "dicom-ai-node-1"
    institution_name: str = ""
    station_name: str = "AINODE"
    seg_series_number: int = Field(9901, ge=1)
    sr_series_number: int = Field(9902, ge=1)

    def output_identity(self, software_version: str) -> OutputIdentity:
        return OutputIdentity(
            manufacturer=self.manufacturer,
            manufacturer_model_name=self.manufacturer_model_name,
            software_versions=software_version,
            device_serial_number=self.device_serial_number,
            institution_name=self.institution_name,
            station_name=self.station_name,
            seg_series_number=self.seg_series_number,
            sr_series_number=self.sr_series_number,
        )


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AINODE_", env_nested_delimiter="__", extra="forbid")

    ae_title: str = "AINODE"
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)
    spool_dir: Path = Path("var/spool")
    database_url: str = "sqlite:///var/ainode.db"
    # serve/worker bring an older database schema up to date at start (alembic migrations). Set false
    # where an operator runs `dicom-ai-node db upgrade` by hand (scale-out): the node then refuses to
    # start against an out-of-date schema, with one line saying so.
    auto_upgrade_schema: bool = True
    # Below this much free disk the SCP refuses instances with 0xA700 instead of risking a torn write.
    disk_reserve_mb: int = Field(500, ge=0)
    quiet_period_s: float = Field(5, ge=0)
    sweep_interval_s: float = Field(1, gt=0)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    rules_file: Path = Path("config/rules.yaml")
    destinations: list[Destination] = Field(default_factory=list)
    # PACS to pull studies from (query/retrieve); see docs/operations.md, "Pulling from a PACS".
    sources: list[Source] = Field(default_factory=list)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _ae = field_validator("ae_title")(check_ae_title)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return url

    @model_validator(mode="after")
    def _unique_destinations(self) -> NodeSettings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique: {names}")
        sources = [s.name for s in self.sources]
        if len(sources) != len(set(sources)):
            raise ValueError(f"source names must be unique: {sources}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file comes in as init kwargs; environment variables override it.
        return (env_settings, init_settings)

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError("destinations", f"no destination named {name!r}")

    def source(self, name: str) -> Source:
        for src in self.sources:
            if src.name == name:
                return src
        raise ConfigError("sources", f"no source named {name!r}")

    def resolve_paths(self, base: Path) -> NodeSettings:
        """Make relative paths relative to the config file's directory's parent (the install root)."""
        updates: dict[str, Any] = {}
        if not self.spool_dir.is_absolute():
            updates["spool_dir"] = (base / self.spool_dir).resolve()
        if not self.rules_file.is_absolute():
            updates["rules_file"] = (base / self.rules_file).resolve()
        http_paths = {
            key: (base / value).resolve()
            for key in ("tls_cert", "tls_key")
            if (value := getattr(self.http, key)) is not None and not value.is_absolute()
        }
        if http_paths:
            updates["http"] = self.http.model_copy(update=http_paths)
        if self.dicom.tls is not None:
            updates["dicom"] = self.dicom.model_copy(
                update={"tls": _resolved(self.dicom.tls, base, ("cert", "key", "ca"))}
            )
        if any(d.tls is not None for d in self.destinations):
            updates["destinations"] = [
                d
                if d.tls is None
                else d.model_copy(update={"tls": _resolved(d.tls, base, ("ca", "cert", "key"))})
                for d in self.destinations
            ]
        if self.database_url.startswith("sqlite:///") and not self.database_url.startswith("sqlite:////"):
            rel = self.database_url.removeprefix("sqlite:///")
            updates["database_url"] = "sqlite:///" + str((base / rel).resolve())
        return self.model_copy(update=updates)


_M = TypeVar("_M", bound=BaseModel)


def _resolved(model: _M, base: Path, keys: tuple[str, ...]) -> _M:
    """A copy of `model` with its relative path fields made absolute under `base`."""
    paths = {
        key: (base / value).resolve()
        for key in keys
        if (value := getattr(model, key)) is not None and not value.is_absolute()
    }
    return model.model_copy(update=paths)


def _format_validation_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    return ConfigError(key, first["msg"])


def load_settings(path: Path | None = None, base_dir: Path | None = None) -> NodeSettings:
    """Load settings from a YAML file (optional) plus environment overrides.

    Relative paths resolve against `base_dir`, by default the current working directory.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("<file>", f"cannot read {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("<file>", f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("<root>", f"{path} must hold a mapping at the top level")
        data = loaded or {}
    try:
        settings = NodeSettings(**data)
    except ValidationError as exc:
        raise _format_validation_error(exc) from exc
    return settings.resolve_paths(base_dir or Path.cwd())
