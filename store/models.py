"""SQLAlchemy 2 models: API keys, datasets, jobs, per-step metrics and checkpoints.

The database is the only record of a job's state (Celery only delivers ids). Every constraint
has a name (the naming convention) so that migrations can refer to it on SQLite and PostgreSQL
alike; enums are stored as strings; timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    MetaData,
    String,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.contract import CheckpointKind

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """``<prefix>_<32 hex>``: 128 random bits, e.g. ``job_3f2a...``."""
    return f"{prefix}_{secrets.token_hex(16)}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend. SQLite stores no offset and returns
    naive values; they are UTC by construction, so the zone is put back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC timestamps")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Stored as VARCHAR holding the value ("queued"), never a native PostgreSQL ENUM type:
    # adding a state later is then a code change, not an ALTER TYPE.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class ApiKey(Base):
    """An API key (``store.apikeys``): only its sha256 and a short visible ``prefix`` (its
    first 12 characters, ``lmf_`` and 8 random ones, unique) are stored; the key itself is
    shown once, at creation. ``name`` is the principal it acts for: keys created with the
    same name share their datasets and jobs (so a key can be rotated: create a new one with
    the same name, then revoke the old one). A revoked key (``revoked_at`` set) is refused."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    num_chars: Mapped[int] = mapped_column(BigInteger)
    num_lines: Mapped[int] = mapped_column(BigInteger)
    num_words: Mapped[int] = mapped_column(BigInteger)  # whitespace-separated tokens
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The principal (app.auth.Principal.id: the name its API keys were created with) that
    # uploaded it; only it and admins see it. NULL for rows older than migration 0004: only
    # admins see those.
    owner_id: Mapped[str | None] = mapped_column(String(40))
    # Migration 0005 (app.datasets, core.labelled): "text" (plain UTF-8, "\n" line ends only)
    # or "labelled" (JSON Lines, one {"text", "label"} per line); the upload's source format
    # ("text", "jsonl", "csv", "tsv"), how many files it was made of and how they were
    # compressed ("none", "gzip", "zstd", "mixed"); a labelled dataset's example count and
    # label -> count; statistics per tokenizer kind (core.textstats.tokenizer_stats).
    kind: Mapped[str] = mapped_column(String(16), default="text", server_default="text")
    format: Mapped[str] = mapped_column(String(16), default="text", server_default="text")
    num_files: Mapped[int] = mapped_column(default=1, server_default="1")
    compression: Mapped[str] = mapped_column(String(16), default="none", server_default="none")
    num_examples: Mapped[int | None] = mapped_column(BigInteger)
    labels: Mapped[dict[str, Any] | None]
    stats: Mapped[dict[str, Any] | None]

    __table_args__ = (
        Index("ix_datasets_created_at_id", "created_at", "id"),
        Index("ix_datasets_owner_id_created_at_id", "owner_id", "created_at", "id"),
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(_str_enum(JobStatus, "job_status"))
    spec: Mapped[dict[str, Any]]  # JobSpec with defaults filled in
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The lease of the attempt that runs the job: renewed by its heartbeat; a running job whose
    # heartbeat is older than LMFORGE_LEASE_S has lost its worker (store.sweep).
    heartbeat_at: Mapped[datetime | None]
    # When the job's message was last handed to the broker (None: never, e.g. the broker was
    # down at submission). The queued sweep re-enqueues queued jobs whose message is lost.
    enqueued_at: Mapped[datetime | None]
    # Attempts claimed so far (numbered from 1, never reused: job_attempts keeps one row each).
    attempts: Mapped[int] = mapped_column(default=0)
    # How many of them ended because their worker shut down gracefully (the job was handed
    # back with a checkpoint): not the job's fault, so they do not count toward
    # LMFORGE_MAX_ATTEMPTS, which limits ``attempts - interruptions``.
    interruptions: Mapped[int] = mapped_column(default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    progress: Mapped[dict[str, Any]]  # {step, total_steps, tokens_seen}
    latest_metrics: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]  # {code, message[, step]}
    # The principal that submitted it (as Dataset.owner_id); NULL for jobs older than
    # migration 0004, which only admins see.
    owner_id: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (
        # Listing newest first with a (created_at, id) keyset cursor.
        Index("ix_jobs_created_at_id", "created_at", "id"),
        # A principal's own jobs, newest first.
        Index("ix_jobs_owner_id_created_at_id", "owner_id", "created_at", "id"),
        # The orphan sweep: running jobs with a stale heartbeat.
        Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
        # The queued sweep: queued jobs whose message may be lost.
        Index("ix_jobs_status_enqueued_at", "status", "enqueued_at"),
    )


class JobAttempt(Base):
    """One row per attempt at running a job (``jobs.attempts`` numbers them from 1): which
    worker, when, from which checkpoint step it resumed, and how it ended (``outcome``:
    ``running`` while it runs, then ``succeeded``, ``failed``, ``cancelled``, ``interrupted``
    (the worker shut down and handed the job back), ``lost`` (the worker died; its lease
    expired) or ``out_of_memory``)."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    resumed_from_step: Mapped[int | None]
    outcome: Mapped[str] = mapped_column(String(32), default="running")
    error: Mapped[dict[str, Any] | None]


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` for a creating request (``scope``: ``jobs`` or
    ``datasets``): the sha256 of the request it came with and the id of what it created. A
    retry with the same key and body returns that resource; the same key with another body is
    a 409. Rows older than ``LMFORGE_IDEMPOTENCY_TTL_S`` are ignored and purged."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)


class Metric(Base):
    """One row per (job, optimizer step), keyed and ordered by the step. ``values`` holds the
    step's named metrics as JSON (``core.contract.StepMetrics`` for language-model jobs:
    ``train_loss``, ``lr``, ..., ``val_*`` only on steps where validation ran), so a job kind
    reports its own metrics without a schema migration per metric."""

    __tablename__ = "metrics"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(primary_key=True)
    values: Mapped[dict[str, Any]]


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[CheckpointKind] = mapped_column(_str_enum(CheckpointKind, "checkpoint_kind"))
    step: Mapped[int]
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_checkpoints_job_id_kind_step", "job_id", "kind", "step"),)


class JobSample(Base):
    """Sample responses a job stored at one step (migration 0006): ``values`` is a JSON list
    of objects, each with at least ``prompt``, ``response`` and ``reward`` (a PPO job's
    rollouts at an evaluation interval). Keyed by (job, step) and upserted
    (:func:`store.samples.record_samples`): a resumed run that replays an evaluation replaces
    its row, never duplicates it."""

    __tablename__ = "job_samples"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(primary_key=True)
    values: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """A job's webhook (``spec.notify``, migration 0007), and the log of its delivery.

    Made with the job, ``state`` ``waiting``; when the job has reached a terminal status the
    API's delivery thread (:mod:`app.webhooks`) sets ``event`` (``job.succeeded``,
    ``job.failed``, ``job.cancelled``) and ``pending``, then tries it: ``delivered`` on a 2xx
    answer, ``pending`` again with ``next_attempt_at`` after a failed try (exponential
    backoff), ``failed`` after the last try or when the URL is refused at delivery time.
    ``next_attempt_at`` is also a try's lease: the thread that claims a try moves it past the
    try's timeout with a compare-and-set, so two API processes never send one try twice."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2000))
    state: Mapped[str] = mapped_column(String(16), default="waiting")
    event: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    __table_args__ = (
        # The delivery thread: waiting rows (their jobs' status), due pending rows.
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_job_id", "job_id"),
    )
