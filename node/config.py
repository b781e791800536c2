"""Typed node configuration, validated once at start-up.

Why pydantic with ``extra="forbid"`` everywhere: a typo in a hospital's YAML
(``ae_tilte``) must stop the node with the key named, not be silently ignored
while the node runs on a default the admin never chose.

Sources, highest priority first: environment variables (``AINODE_`` prefix,
``__`` between nested keys, the pydantic-settings convention), the YAML file
given with ``--config``, then the embedded defaults below. The defaults alone
run a complete node: data under ``./data``, SQLite, port 11112, AE ``AINODE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url

from pipelines.dicom_out import registry as writers
from storage.errors import ConfigError
from storage.suggest import did_you_mean

__all__ = [
    "CallerConfig",
    "DestinationConfig",
    "DicomConfig",
    "InferenceConfig",
    "LoggingConfig",
    "NodeConfig",
    "QAConfig",
    "QueueConfig",
    "ResultKind",
    "SeriesConfig",
    "StorageConfig",
    "TLSConfig",
    "WebConfig",
    "default_accepts",
    "load_config",
    "yaml_problem",
]

# DICOM PS3.5 AE titles: up to 16 characters of the default repertoire, no
# backslash or control characters, and not all spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_kind(value: str) -> str:
    # Checked against the writer registry when the config is read, so a plug-in
    # writer's kind is accepted exactly when that plug-in is installed.
    known = writers.kinds()
    if value not in known:
        raise ValueError(f"unknown result kind {value!r}; known: {', '.join(known)}")
    return value


ResultKind = Annotated[str, AfterValidator(_check_kind)]


def default_accepts() -> list[str]:
    """What a destination takes when its configuration does not say (the registry's defaults)."""
    return list(writers.default_kinds())


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable characters, no backslash, not all spaces")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TLSConfig(_Section):
    """TLS on DICOM associations (PS3.15 Annex B, the secure transport profile)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(
        default=None, description="CA bundle used to verify peers' certificates"
    )
    require_peer_cert: bool = Field(
        default=False, description="refuse peers that present no certificate signed by ca_file"
    )
    key_password_file: Path | None = Field(
        default=None,
        description="file holding the key's passphrase; or AINODE_DICOM__TLS__KEY_PASSWORD",
    )
    key_password: SecretStr | None = Field(default=None, repr=False)

    def passphrase(self) -> str | None:
        """The private key's passphrase (None: the key is not encrypted); never logged."""
        if self.key_password is not None:
            return self.key_password.get_secret_value()
        if self.key_password_file is not None:
            return read_secret(self.key_password_file, "dicom.tls.key_password_file")
        return None

    @model_validator(mode="after")
    def _needs_files(self) -> TLSConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs cert_file and key_file")
        if self.require_peer_cert and self.ca_file is None:
            raise ValueError("tls.require_peer_cert needs ca_file")
        return self


class CallerConfig(_Section):
    """A peer allowed to open an association: its calling AE title and, optionally, hosts."""

    ae_title: AETitle
    hosts: list[str] = Field(
        default_factory=list, description="source IP addresses; empty means any host"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        # Allow the short form `- PACS` in YAML for a caller with no host restriction.
        if isinstance(value, str):
            return {"ae_title": value}
        return value


class DicomConfig(_Section):
    ae_title: AETitle = "AINODE"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    allowed_callers: list[CallerConfig] = Field(
        default_factory=list,
        description="who may associate; an empty list accepts any caller (logged as a warning)",
    )
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    max_pdu: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    acse_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_connections_per_host_per_minute: Annotated[int, Field(ge=0)] = Field(
        default=0, description="per calling host, burst as large; 0: no limit")
    tls: TLSConfig = Field(default_factory=TLSConfig)

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, value: int) -> int:
        # PS3.8: 0 means unlimited; otherwise a PDU must hold at least its own header.
        if value != 0 and value < 4096:
            raise ValueError("max_pdu is 0 (unlimited) or at least 4096 bytes")
        return value


class StorageConfig(_Section):
    data_dir: Path = Path("data")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: a SQLite file <data_dir>/ainode.db",
    )
    spool_dir: Path | None = Field(default=None, description="default: <data_dir>/spool")
    results_dir: Path | None = Field(default=None, description="default: <data_dir>/results")
    min_free_mb: Annotated[int, Field(ge=0)] = 1024
    retention_days: Annotated[float, Field(gt=0)] = 30.0
    database_wait_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=60.0,
        description="ainode serve/worker: how long to retry an unreachable database at "
        "start-up (backoff 1, 2, 4 ... 15 s) before giving up with exit code 1",
    )
    database_password_file: Path | None = Field(
        default=None,
        description="file holding the database password (kept out of the URL and the config); "
                    "or AINODE_STORAGE__DATABASE_PASSWORD",
    )
    database_password: SecretStr | None = Field(default=None, repr=False)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            password = self.database_password.get_secret_value() if self.database_password \
                else None
            if password is None and self.database_password_file is not None:
                password = read_secret(self.database_password_file,
                                       "storage.database_password_file")
            if password is not None:
                return make_url(self.database_url).set(password=password).render_as_string(
                    hide_password=False)
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ainode.db').resolve()}"

    @property
    def effective_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def effective_results_dir(self) -> Path:
        return self.results_dir if self.results_dir is not None else self.data_dir / "results"


class SeriesConfig(_Section):
    stable_age_s: Annotated[float, Field(gt=0, le=86400)] = 10.0
    rerun_on_growth: bool = Field(
        default=True,
        description="a routed series that receives more instances is analysed again "
        "(a new job superseding the old result)",
    )


class InferenceConfig(_Section):
    device: str = "auto"
    models_dir: Path | None = Field(
        default=None, description="default: the demo weights shipped in pipelines/weights"
    )
    max_jobs_per_device: Annotated[int, Field(ge=1, le=64)] = 1
    job_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    candidates_dir: Path | None = Field(
        default=None, description="where `ainode models shadow` keeps model sets under "
        "trial; default: <data_dir>/models/candidates")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("device is 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class DestinationConfig(_Section):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    type: Literal["dicom", "dicomweb"] = "dicom"
    url: str | None = Field(default=None, description="dicomweb: the STOW-RS base URL "
                            "(results are POSTed to <url>/studies)")
    ae_title: AETitle
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    accepts: list[ResultKind] = Field(default_factory=default_accepts)
    calling_ae_title: AETitle | None = Field(
        default=None, description="AE title we present; default: dicom.ae_title"
    )
    tls: bool = False

    @model_validator(mode="before")
    @classmethod
    def _dicomweb_defaults(cls, value: Any) -> Any:
        # A DICOMweb destination is named by its URL; host and port follow from it
        # and the AE title is only a label there.
        if isinstance(value, dict) and value.get("type") == "dicomweb":
            from urllib.parse import urlsplit

            url = value.get("url")
            if not url or urlsplit(str(url)).scheme not in ("http", "https"):
                raise ValueError("a dicomweb destination needs url: http(s)://host[:port]/path")
            parts = urlsplit(str(url))
            value = {"ae_title": "DICOMWEB", "host": parts.hostname or "",
                     "port": parts.port or (443 if parts.scheme == "https" else 80), **value}
        return value


class WebConfig(_Section):
    """The web console, REST API, DICOMweb and /metrics (node.web)."""

    enabled: bool = Field(default=False, description="serve it from `ainode serve` too "
                          "(`ainode web` serves it on its own either way)")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    cert_file: Path | None = Field(default=None, description="TLS certificate (PEM)")
    key_file: Path | None = Field(default=None, description="TLS private key (PEM)")
    session_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 8.0
    max_failed_logins: Annotated[int, Field(ge=1, le=100)] = 5
    failed_login_window_s: Annotated[float, Field(gt=0)] = 300.0

    @model_validator(mode="after")
    def _tls_pair(self) -> WebConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("web TLS needs both cert_file and key_file")
        return self


class SendConfig(_Section):
    """How sending to destinations retries (node.send.RetryPolicy)."""

    retry_base_s: Annotated[float, Field(gt=0)] = 30.0
    retry_ceiling_s: Annotated[float, Field(gt=0)] = 3600.0
    retry_max_attempts: Annotated[int, Field(ge=1)] = 20
    retry_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.2


class SyslogConfig(_Section):
    """Forwarding of audit messages to a collector over TLS (RFC 5425), as IHE ATNA does."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 6514
    ca_file: Path | None = Field(default=None, description="CA bundle to verify the collector")
    cert_file: Path | None = Field(default=None, description="our client certificate, if asked")
    key_file: Path | None = None
    app_name: str = "ainode"


class AuditConfig(_Section):
    """The audit trail's hash chain (storage.audit_chain) and where it is published."""

    seal_interval_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    checkpoint_every: Annotated[int, Field(ge=1)] = 1000
    checkpoint_interval_s: Annotated[float, Field(gt=0)] = 300.0
    key_file: Path | None = Field(
        default=None,
        description="HMAC key for checkpoints (outside the database); or AINODE_AUDIT_KEY",
    )
    syslog: SyslogConfig = Field(default_factory=SyslogConfig)

    def key(self) -> bytes | None:
        """The checkpoint key: AINODE_AUDIT_KEY, else key_file's bytes, else None."""
        env = os.environ.get("AINODE_AUDIT_KEY")
        if env:
            return env.encode()
        if self.key_file is not None:
            return read_secret(self.key_file, "audit.key_file").encode()
        return None


def read_secret(path: Path, what: str) -> str:
    """A secret kept in its own file (a mounted secret, systemd's LoadCredential):
    its first line, whitespace stripped; the value never reaches a message."""
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"{what}: cannot read secret file {path}") from exc


class QueueConfig(_Section):
    """Dispatch through Celery (node.queue); without ``broker_url`` jobs run in-process."""

    broker_url: str | None = Field(
        default=None, description="amqp://user:pass@host:5672/vhost (RabbitMQ) or "
        "redis://host:6379/0; unset: `ainode serve` runs jobs itself, no broker")
    consumer_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=1800.0, description="the broker's limit on an unacknowledged message: "
        "RabbitMQ's consumer_timeout (rabbitmq.conf; its default is 30 min); workers "
        "refuse to start when it is not above inference.job_timeout_s")
    publish_grace_s: Annotated[float, Field(gt=0)] = Field(
        default=300.0, description="the sweep re-publishes a queued job whose last "
        "message is older than this")
    sweep_interval_s: Annotated[float, Field(gt=0)] = 30.0
    lease_s: Annotated[float, Field(ge=1)] = 60.0
    pipeline_queues: dict[str, str] = Field(
        default_factory=dict, description="pipeline name -> queue, over the device class "
        "its package declares (cpu, gpu)")


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["keyvalue", "json"] = "keyvalue"
    file: Path | None = Field(default=None, description="default: standard error")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class SegmentMatch(_Section):
    """Which segments of a reader's SEG mean one training label: by code or by label."""

    codes: list[str] = Field(default_factory=list,
                             description="SegmentedPropertyType as SCHEME:VALUE")
    labels: list[str] = Field(default_factory=list, description="SegmentLabel, any case")


def _default_segments() -> dict[str, SegmentMatch]:
    return {
        # SCT 15776009 Pancreas; 108369006 Neoplasm, 4147007 Mass, 255050008 Tumour
        # (Table CID 7151/7159 style codes a reader's workstation writes).
        "pancreas": SegmentMatch(codes=["SCT:15776009"], labels=["pancreas"]),
        "lesion": SegmentMatch(codes=["SCT:108369006", "SCT:4147007", "SCT:255050008",
                                      "SCT:372142002", "SCT:363418001"],
                               labels=["lesion", "tumour", "tumor", "mass", "pdac"]),
    }


class DatasetConfig(_Section):
    """``ainode dataset export``: reader-made SEGs -> a de-identified MSD training set."""

    segments: dict[str, SegmentMatch] = Field(
        default_factory=_default_segments,
        description="training label (pancreas = 1, lesion = 2) -> the segments meaning it")
    deid_dir: Path | None = Field(
        default=None, description="the de-identification key and the UID/ID mappings, "
        "kept here and never exported; default: <data_dir>/deid")
    gdcmanon: str = Field(default="gdcmanon", description="GDCM's PS3.15 anonymiser")

    @field_validator("segments")
    @classmethod
    def _labels(cls, value: dict[str, SegmentMatch]) -> dict[str, SegmentMatch]:
        unknown = sorted(set(value) - {"pancreas", "lesion"})
        if unknown:
            raise ValueError(f"training labels are pancreas and lesion, not {unknown}")
        return value


class QAConfig(_Section):
    """Drift monitoring (``ainode qa``): the recent jobs against the model package's reference.

    A descriptor alerts only when both tests agree (PSI above ``psi`` and the KS p
    below ``ks_p``): one odd bin on a small window should not page anyone.
    """

    enabled: bool = Field(default=True, description="record each job's quality record")
    interval_s: float = Field(default=3600.0, ge=0.0, description="how often ainode serve "
                              "runs the check (audited alerts); 0: only ainode qa check")
    window_days: float = Field(default=30.0, gt=0.0, description="the recent window compared")
    psi: float = Field(default=0.25, gt=0.0, description="population stability index limit")
    ks_p: float = Field(default=0.01, gt=0.0, lt=1.0, description="Kolmogorov-Smirnov p limit")
    mmd_p: float = Field(default=0.01, gt=0.0, lt=1.0,
                         description="feature MMD permutation p limit")
    outlier_z: float = Field(default=4.0, gt=0.0,
                             description="robust z beyond which a series is an outlier")
    min_window: int = Field(default=5, ge=2, description="fewer jobs in a group: no test")


class NodeConfig(BaseSettings):
    """The whole node configuration; see config/node.example.yaml for every key."""

    model_config = SettingsConfigDict(
        env_prefix="AINODE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    dicom: DicomConfig = Field(default_factory=DicomConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    series: SeriesConfig = Field(default_factory=SeriesConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    send: SendConfig = Field(default_factory=SendConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    qa: QAConfig = Field(default_factory=QAConfig)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; environment variables win over it.
        return (env_settings, init_settings)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section holding ``loc``'s last part accepts (for "did you mean")."""
    model: Any = NodeConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        ann = fields[part].annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else next(
            (a for a in args if issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(err["loc"][-1]), _known_keys(tuple(err["loc"])))
            msg = "unknown key" + (f"; did you mean {hint}?" if hint else "")
        lines.append(f"  {key}: {msg}")
    return f"invalid configuration ({origin}):\n" + "\n".join(lines)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """``line 3, column 12: mapping values are not allowed here`` (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_config(path: Path | str | None = None) -> NodeConfig:
    """Load and validate the configuration, raising ConfigError naming each bad key."""
    data: dict[str, Any] = {}
    origin = "embedded defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") \
                from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = loaded
    try:
        return NodeConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin + " + AINODE_* environment")) from exc
