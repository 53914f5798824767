"""Response bodies of the HTTP API (pydantic v2). Request bodies: ``core.spec.JobSpec``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DatasetOut(_FromRow):
    id: str
    name: str
    bytes: int
    sha256: str
    num_chars: int
    num_lines: int
    num_words: int
    created_at: datetime


class DatasetList(BaseModel):
    data: list[DatasetOut]
    has_more: bool
    next_after: str | None


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0
    tokens_seen: int = 0


class JobError(BaseModel):
    code: str
    message: str
    step: int | None = None


class JobOut(_FromRow):
    id: str
    name: str | None
    status: str
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    cancel_requested: bool
    progress: Progress
    latest_metrics: dict[str, Any] | None
    error: JobError | None


class JobList(BaseModel):
    data: list[JobOut]
    has_more: bool
    next_after: str | None  # pass as ?after= for the next (older) page


class MetricOut(_FromRow):
    step: int
    epoch: float
    train_loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    tokens_seen: int
    val_loss: float | None
    val_ppl: float | None
    val_bpc: float | None
    val_accuracy: float | None
    val_top5_accuracy: float | None


class MetricList(BaseModel):
    data: list[MetricOut]
    has_more: bool


class CheckpointOut(_FromRow):
    id: str
    job_id: str
    kind: str
    step: int
    bytes: int
    sha256: str
    metrics: dict[str, Any]
    created_at: datetime


class CheckpointList(BaseModel):
    data: list[CheckpointOut]


class JobResultOut(BaseModel):
    """The outcome of a finished job. Losses are nats/token; ``*_ppl`` = exp(loss)."""

    job_id: str
    status: str
    stop_reason: str | None = None
    steps: int | None = None
    epochs: float | None = None
    tokens_seen: int | None = None
    duration_s: float | None = None
    train_tokens_per_s: float | None = None
    final_val_loss: float | None = None
    final_val_ppl: float | None = None
    best_val_loss: float | None = None
    best_val_ppl: float | None = None
    best_step: int | None = None
    best_checkpoint_id: str | None = None
    last_checkpoint_id: str | None = None
    vocab_size: int | None = None
    num_params: int | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    test_bpc: float | None = None
    test_accuracy: float | None = None
    test_top5_accuracy: float | None = None
    embedding_coverage: float | None = None
    error: JobError | None = None


class Health(BaseModel):
    status: str  # "ok" | "degraded"
    database: bool
    broker: bool | None  # None: not checked (no broker configured for this app)
