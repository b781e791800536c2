"""The node's tables (SQLAlchemy 2.0 typed ORM), one row per unit of work.

Why rows rather than folders: every stage (receive -> complete -> route ->
preprocess -> infer -> write -> send) reads its work from a row with a state
and timestamps, and hands the next stage a row. A state change is a
transaction, so a crash leaves each item in exactly one state, and several
workers on other machines can claim jobs from one PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED`` (see storage.jobs).

Identities (patient name and ID) are kept on Study for matching and in the
audit log; they never go to log lines.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ApiToken",
    "AuditCheckpoint",
    "AuditCursor",
    "AuditEvent",
    "Base",
    "Destination",
    "Finding",
    "FindingVerdict",
    "Instance",
    "Job",
    "JobOutcome",
    "JobState",
    "ModelCandidate",
    "NodeHeartbeat",
    "Output",
    "QualityCheck",
    "QualityRecord",
    "ReferenceDiagnosis",
    "RoutingRule",
    "Series",
    "SeriesState",
    "Study",
    "Transfer",
    "TransferState",
    "User",
    "UserRole",
    "WebSession",
    "WorkerState",
    "utcnow",
]

UID = String(64)  # PS3.5: a UID is at most 64 characters
AE = String(16)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps that are always timezone-aware UTC, on both back ends.

    SQLite stores datetimes without a zone and hands them back naive; comparing
    those with ``utcnow()`` would raise. Stored as UTC, returned as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Explicit constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances still arriving
    COMPLETE = "complete"  # no new instance for the stable age
    ROUTED = "routed"  # routing rules evaluated (jobs may or may not exist)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobOutcome(enum.StrEnum):
    """A done job's verdict: the pipeline judged the series, or said why it could not."""

    ASSESSED = "assessed"
    NOT_ASSESSABLE = "not_assessable"


class TransferState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # gave up after the retry ceiling


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (no native ENUM type) so adding a state is a code
    # change, not a PostgreSQL type migration.
    return Enum(cls, name=name, native_enum=False, length=16,
                values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(AE)
    state: Mapped[SeriesState] = mapped_column(
        _enum(SeriesState, "series_state"), default=SeriesState.RECEIVING, index=True
    )
    instance_count: Mapped[int] = mapped_column(default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Routing attributes of a representative instance (keyword -> value); no PHI.
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[datetime | None]
    reopened_count: Mapped[int] = mapped_column(default=0)
    # Why routing made no job for this series although it is routed: it is no image a
    # pipeline can judge (storage.image_kind), e.g. "a localizer (ImageType ...)".
    # None for a series routed, unmatched, or routed before this column existed.
    skip_reason: Mapped[str | None] = mapped_column(String(256))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # Path relative to the spool root: the store can move without a migration.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(AE)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Destination(Base):
    """A DICOM peer results are sent to (from the config file or the CLI)."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(AE)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int]
    accepts: Mapped[list[Any]] = mapped_column(default=list)
    calling_ae_title: Mapped[str | None] = mapped_column(AE)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[str] = mapped_column(String(16), default="cli")  # "config" or "cli"
    # "dicom" (C-STORE to ae_title@host:port) or "dicomweb" (STOW-RS to url).
    kind: Mapped[str] = mapped_column(String(16), default="dicom")
    url: Mapped[str | None] = mapped_column(String(512))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RoutingRule(Base):
    """One version of a routing rule. Edits add a version; old versions stay for audit."""

    __tablename__ = "routing_rules"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_routing_rules_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(default=1)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    priority: Mapped[int] = mapped_column(default=0)
    # Conditions as data: [{"key": "Modality", "op": "=", "value": "CT"}, ...]
    conditions: Mapped[list[Any]] = mapped_column(default=list)
    pipeline: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[Any]] = mapped_column(default=list)
    stable_age_s: Mapped[float | None] = mapped_column(Float)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    # A candidate model set (ModelCandidate.name) this rule's jobs run instead of the
    # active models (inference.models_dir); None: the active ones. Set on the shadow
    # rule ``ainode models shadow`` makes, so a new package meets live traffic unsent.
    models: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64))


class Job(Base):
    """One pipeline run on one series for one rule version and model version."""

    __tablename__ = "jobs"
    __table_args__ = (
        # "never two jobs for the same series + rule version + model version
        # unless asked": asking (reprocess) bumps `generation`. rule_key rather
        # than the nullable rule_id, because NULLs never collide in a unique index.
        UniqueConstraint(
            "series_id", "rule_key", "pipeline", "model_version", "generation",
            name="uq_jobs_series_rule_model_generation",
        ),
        Index("ix_jobs_claim", "state", "priority", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    rule_id: Mapped[int | None] = mapped_column(
        ForeignKey("routing_rules.id", ondelete="SET NULL")
    )
    rule_key: Mapped[str] = mapped_column(String(96), default="manual")  # "<name>@v<version>"
    pipeline: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64), default="")
    generation: Mapped[int] = mapped_column(default=0)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(default=0)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    stage: Mapped[str | None] = mapped_column(String(32))  # last stage entered
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))  # who claimed it
    lease_expires_at: Mapped[datetime | None]
    provenance: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What a DONE job's pipeline concluded: "assessed", or "not_assessable" with the
    # reason (the series is outside what the models can judge; the SR says so). Set
    # with DONE; None while unfinished, for failed jobs and for rows older than it.
    outcome: Mapped[JobOutcome | None] = mapped_column(_enum(JobOutcome, "job_outcome"),
                                                       index=True)
    outcome_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Turnaround: last instance received -> results accepted by every destination.
    delivered_at: Mapped[datetime | None]
    turnaround_s: Mapped[float | None] = mapped_column(Float)
    # The version of the series this job was made for: its instance count when routed.
    # A series that grows after routing gets a new job (node.orchestration) that
    # names the one it supersedes; both None on rows older than revision 0003_i21.
    series_instance_count: Mapped[int | None] = mapped_column(Integer)
    # No foreign key on purpose: adding one makes SQLite copy and drop the jobs table,
    # and the drop would cascade to findings and outputs. The id is informative.
    supersedes_job_id: Mapped[int | None] = mapped_column(Integer)
    # Task-queue dispatch (node.queue): the queue the job's last message went to and
    # when. The message is only a wake-up; the sweep re-publishes a queued job whose
    # last publish is older than the grace period (a purged queue, a lost message).
    queue: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime | None]

    series: Mapped[Series] = relationship(back_populates="jobs")
    findings: Mapped[list[Finding]] = relationship(back_populates="job")
    outputs: Mapped[list[Output]] = relationship(back_populates="job")


class Finding(Base):
    """A result: the patient-level score (kind='patient') or one lesion (kind='lesion')."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    location: Mapped[str | None] = mapped_column(String(32))
    diameter_mm: Mapped[float | None] = mapped_column(Float)
    volume_ml: Mapped[float | None] = mapped_column(Float)
    mean_hu: Mapped[float | None] = mapped_column(Float)
    tracking_uid: Mapped[str | None] = mapped_column(UID)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="findings")


class Output(Base):
    """A DICOM object the node wrote (SEG, SR, GSPS, SC instance)."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # SEG | SR | GSPS | SC
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to the results root
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="outputs")
    transfers: Mapped[list[Transfer]] = relationship(back_populates="output")


class Transfer(Base):
    """One output to one destination: its attempts, outcome and next retry."""

    __tablename__ = "transfers"
    __table_args__ = (
        UniqueConstraint("output_id", "destination_id", name="uq_transfers_output_destination"),
        Index("ix_transfers_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id", ondelete="CASCADE"))
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[TransferState] = mapped_column(
        _enum(TransferState, "transfer_state"), default=TransferState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last try
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]

    output: Mapped[Output] = relationship(back_populates="transfers")
    destination: Mapped[Destination] = relationship()


class AuditEvent(Base):
    """Append-only record of who did what to which object, and how it ended.

    This is where identities live (calling AE, OS user, host); log lines carry
    only UIDs and ids.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(48), index=True)  # e.g. "instance.received"
    outcome: Mapped[str] = mapped_column(String(16), default="success")  # success|failure|warning
    actor: Mapped[str | None] = mapped_column(String(128))  # calling AE, OS user, "scheduler"
    host: Mapped[str | None] = mapped_column(String(255))
    study_uid: Mapped[str | None] = mapped_column(UID)
    series_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The hash chain (storage.audit_chain): set when the row is sealed, a moment
    # after it commits; NULL until then.
    chain_seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    row_hash: Mapped[str | None] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A published point of the audit hash chain: its head at ``chain_seq``, with an HMAC
    under a key kept outside the database when one is configured."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    chain_seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    row_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(64))


class AuditCursor(Base):
    """How far a consumer of the chain (the syslog forwarder) has got, by ``chain_seq``."""

    __tablename__ = "audit_cursors"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class UserRole(enum.StrEnum):
    """What a console or API user may do: ``viewer`` reads, ``admin`` also changes."""

    VIEWER = "viewer"
    ADMIN = "admin"


class User(Base):
    """A local user of the web console and REST/DICOMweb API (node.web)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # argon2id (argon2-cffi's PHC string); the password itself is never stored.
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"),
                                           default=UserRole.VIEWER)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A logged-in browser: only the token's SHA-256 is kept, so a database dump logs no one in."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ApiToken(Base):
    """A machine's bearer token (a PACS posting STOW-RS, Prometheus scraping); SHA-256 only."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]


class NodeHeartbeat(Base):
    """A node component's last sign of life, for ``ainode status``: is the node up?

    One row per (component, host, pid): the scheduler of each ``ainode serve``
    beats every few seconds and says which port its receivers listen on. Worker
    heartbeats are their own table (the worker's lease and slots); this one is the
    node process itself.
    """

    __tablename__ = "node_heartbeats"
    __table_args__ = (UniqueConstraint("component", "host", "pid",
                                       name="uq_node_heartbeats_component_host_pid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    component: Mapped[str] = mapped_column(String(32))  # "scheduler"
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[datetime | None]
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # port, receiver processes


class WorkerState(Base):
    """One job-running process as it last reported itself (``ainode status``, ``jobs list``).

    Written by the worker itself: a row per process name, its heartbeat renewed
    while it lives. It says who is there to take which queue's work; the job
    rows, not this table, decide who holds a job.
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid:nonce
    kind: Mapped[str] = mapped_column(String(16), default="celery")  # celery | polling
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    queues: Mapped[list[Any]] = mapped_column(default=list)
    state: Mapped[str] = mapped_column(String(16), default="idle")  # idle|running|stopped
    current_job_id: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class FindingVerdict(Base):
    """A reader's verdict on one finding: agree, disagree or uncertain, with a comment.

    Rows are appended, never updated: a reader who changes their mind adds a row and
    the newest row of a (finding, reader) pair counts (node.live), so the history of
    what was said stays for audit. The reader is a name (web user, OS user, or the
    AE title of a PACS that sent a Key Object Selection), never patient data.
    """

    __tablename__ = "finding_verdicts"

    id: Mapped[int] = mapped_column(primary_key=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id", ondelete="CASCADE"),
                                            index=True)
    verdict: Mapped[str] = mapped_column(String(16))  # agree | disagree | uncertain
    comment: Mapped[str | None] = mapped_column(Text)
    reader: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(16), default="cli")  # cli | web | api | dicom
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ReferenceDiagnosis(Base):
    """What a series really showed, learned later (pathology, follow-up), per series.

    ``diagnosis`` is the site's word for it (for the pancreas pipelines one of the
    tumour types: normal, PDAC, PNET, IPMN, other_benign); ``positive`` says whether
    the disease the models look for is present, which is what sensitivity counts.
    Appended like verdicts; the newest row of a series counts.
    """

    __tablename__ = "reference_diagnoses"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"),
                                           index=True)
    diagnosis: Mapped[str] = mapped_column(String(64))
    positive: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16), default="feedback")  # feedback|sr|csv
    comment: Mapped[str | None] = mapped_column(Text)
    reader: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ModelCandidate(Base):
    """A model set under trial: a models folder a shadow rule's jobs run, until promoted.

    ``path`` is the candidate's own folder of packages (the new package plus copies of
    the active ones it does not replace), so a shadow job runs exactly the set that
    promotion would make active.
    """

    __tablename__ = "model_candidates"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(512))
    packages: Mapped[list[Any]] = mapped_column(default=list)  # the packages it brings
    rule_name: Mapped[str | None] = mapped_column(String(64))  # its shadow rule
    state: Mapped[str] = mapped_column(String(16), default="shadow")  # shadow|promoted|retired
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))
    promoted_at: Mapped[datetime | None]


class QualityRecord(Base):
    """What one job saw and answered, for drift monitoring (one row per job that ran).

    ``descriptors``: the input's numbers, from the series header (kVp, slice
    thickness, pixel spacing) and from the pipeline (HU statistics of the organ);
    ``outputs``: the model's raw answers (patient score, candidates, top
    confidence); ``features``: the pooled encoder features (or null). ``scanner``
    is the group a report compares by: manufacturer and model name, no identity.
    ``header`` keeps the categorical header values (kernel, contrast agent) that
    are listed, not tested.
    """

    __tablename__ = "quality_records"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"),
                                           index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64), default="")
    scanner: Mapped[str] = mapped_column(String(128), default="unknown")
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    assessed: Mapped[bool] = mapped_column(Boolean, default=True)
    descriptors: Mapped[dict[str, Any]] = mapped_column(default=dict)
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    features: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    header: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class QualityCheck(Base):
    """One comparison of a recent window with the model package's reference, per group.

    The newest row of a (pipeline, scanner) group is that group's state: its
    ``alerts`` are what ``ainode status``, the metrics and the console show.
    ``scanner`` is ``*`` for all scanners together.
    """

    __tablename__ = "quality_checks"

    id: Mapped[int] = mapped_column(primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    scanner: Mapped[str] = mapped_column(String(128))
    window_days: Mapped[float] = mapped_column(Float)
    n_recent: Mapped[int] = mapped_column(default=0)
    n_reference: Mapped[int] = mapped_column(default=0)
    reference: Mapped[str | None] = mapped_column(String(256))  # what it was fitted on
    alerts: Mapped[list[Any]] = mapped_column(default=list)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
