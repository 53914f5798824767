"""Response bodies of the HTTP API (pydantic v2). Request bodies: ``core.spec.JobSpec``.

The metric and result models are derived from the engine contract's dataclasses
(``core.contract``), so each field is defined once; ``tests/test_one_definition.py`` pins it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model

from core.classification import ClassificationResult
from core.contract import StepMetrics, TrainingResult
from core.ppo import PPOResult
from store.models import Metric


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
    # The principal (API key name) it belongs to; null for data stored before keys existed.
    owner_id: str | None = None
    # README "Datasets": "text" (UTF-8 text, "\n" line ends) or "labelled" ({text, label}
    # JSON Lines); the upload's format, files and compression; a labelled dataset's examples
    # and label -> count; statistics per tokenizer kind (core.datasetstats; null for datasets
    # uploaded before they were counted). num_chars/num_lines/num_words of a labelled dataset
    # count its examples' texts.
    kind: Literal["text", "labelled"] = "text"
    format: str = "text"
    num_files: int = 1
    compression: str = "none"
    num_examples: int | None = None
    labels: dict[str, int] | None = None
    stats: dict[str, Any] | None = None


class DatasetList(BaseModel):
    data: list[DatasetOut]
    has_more: bool
    next_after: str | None


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0
    tokens_seen: int = 0
    # Issue 13 (app.metricseries): a running job's estimated seconds until its budget is
    # spent, from its recent steps/s (tokens/s, epochs/s) and the remaining max_steps
    # (max_tokens, max_epochs, max_runtime_s), counted from its newest metric row; null when
    # not running or not measurable yet. A queued job's place in the queue (1: next); null
    # unless queued.
    eta_s: float | None = None
    queue_position: int | None = None


class JobError(BaseModel):
    """Why a job failed (docs/operations.md, "Failures and their codes")."""

    code: str  # one of core.contract.ERROR_CODES, e.g. "out_of_memory", "worker_lost"
    message: str  # for a person: what happened and what to change
    # Whether the same spec, submitted again unchanged, may succeed (a fault of the machine or
    # the moment, not of the spec or the data); null when the failure did not record it.
    retryable: bool | None = None
    # Where it happened: "prepare", "train", "evaluate" or "checkpoint"; null when unknown
    # (e.g. a failure outside the engine, such as a lost worker).
    phase: str | None = None
    step: int | None = None  # the optimizer step it happened at, when known


class AttemptOut(_FromRow):
    """One attempt at running a job (``job_attempts``), numbered from 1."""

    attempt: int
    worker: str | None  # the worker process that ran it: "<hostname>:<pid>"
    started_at: datetime
    ended_at: datetime | None  # null while it runs
    resumed_from_step: int | None  # the checkpoint step it resumed from; null: from scratch
    # "running", then "succeeded", "failed", "cancelled", "interrupted" (its worker shut down
    # and handed the job back), "lost" (its worker died) or "out_of_memory".
    outcome: str


class JobOut(_FromRow):
    id: str
    name: str | None
    # The principal (API key name) it belongs to, set from the submitting key, never by the
    # client; null for jobs submitted before keys existed.
    owner_id: str | None = None
    status: str
    spec: dict[str, Any]
    created_at: datetime
    # When the job's message was last handed to the broker; null: not yet (the broker was
    # down at submission: the job waits queued and the queued sweep enqueues it later).
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int  # claimed so far; each has a row in attempt_history
    # How many of them were handed back by a graceful worker shutdown (not counted toward
    # LMFORGE_MAX_ATTEMPTS).
    interruptions: int
    cancel_requested: bool
    progress: Progress
    latest_metrics: dict[str, Any] | None
    error: JobError | None
    attempt_history: list[AttemptOut] = []  # ordered by attempt
    # Queued on a queue that no live worker serves (docs/deploy.md, "Queues and devices"):
    # what it waits for: "cuda" or "cpu" (a device queue), "worker" (the default queue,
    # device "auto"), "cuda x2" / "cpu x2" / "worker x2" (a data-parallel queue of
    # --gpus-per-job 2 workers), or "queue <name>" (resources.queue). Null otherwise, and when
    # the worker registry cannot be read.
    waiting_for: str | None = None


class JobList(BaseModel):
    data: list[JobOut]
    has_more: bool
    next_after: str | None  # pass as ?after= for the next (older) page


def _optional_fields(source: type[Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """``create_model`` field definitions for every field of the dataclass ``source``, each
    optional (a job kind that does not report a value leaves it null)."""
    hints = get_type_hints(source)
    return {f.name: (hints[f.name] | None, None) for f in dataclasses.fields(source)
            if f.name not in skip}


# A step's metrics: derived from core.contract.StepMetrics (the one definition of the
# language-model metrics, their units in its docstring); other job kinds' named metrics pass
# through as extra fields.
MetricOut: type[BaseModel] = create_model(
    "MetricOut",
    __config__=ConfigDict(extra="allow"),
    __doc__="One optimizer step's metrics. Losses are cross-entropy in nats per token; "
            "``val_*`` are set only on steps where validation ran.",
    step=(int, ...),
    **_optional_fields(StepMetrics, skip=("step",)),
)


def metric_out(row: Metric) -> BaseModel:
    """A stored metric row as the API returns it: ``{"step": ..., **values}``."""
    return MetricOut.model_validate({"step": row.step, **row.values})


class MetricDownsample(BaseModel):
    """How ``?resolution=N`` chose the rows (app.metricseries: min/max per bucket)."""

    method: Literal["minmax"] = "minmax"
    metric: str  # the metric whose min and max per bucket were kept
    resolution: int  # N: at most this many rows
    buckets: int  # (N - 2) // 2 buckets of equal step width; 0: every row fitted
    total: int  # the job's rows past after_step, with or without the metric


class MetricList(BaseModel):
    data: list[MetricOut]  # type: ignore[valid-type]
    has_more: bool
    downsample: MetricDownsample | None = None  # set with ?resolution=


class SampleStepOut(BaseModel):
    """The sample responses a job stored at one step (a PPO job's rollouts at an evaluation
    interval): each ``{"prompt", "response", "reward", ...}``; texts longer than 2,000
    characters are cut (``truncated: true``)."""

    step: int
    created_at: datetime
    samples: list[dict[str, Any]]


class SampleList(BaseModel):
    data: list[SampleStepOut]  # by step
    has_more: bool  # more steps follow: ask again with ?after_step=<the last step here>


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


# The outcome of a finished job: derived from core.contract.TrainingResult (what the engine
# returns), plus what the service adds. Extra fields (other job kinds' results) pass through.
JobResultOut: type[BaseModel] = create_model(
    "JobResultOut",
    __config__=ConfigDict(extra="allow"),
    __doc__="The outcome of a finished job. Losses are nats/token; ``*_ppl`` = exp(loss).",
    job_id=(str, ...),
    status=(str, ...),
    best_checkpoint_id=(str | None, None),
    last_checkpoint_id=(str | None, None),
    error=(JobError | None, None),
    **_optional_fields(TrainingResult),
    # A classification job's result (task "classify"): its own fields, those it shares with
    # the language model's (steps, stop_reason, test_accuracy, ...) defined once above.
    **_optional_fields(ClassificationResult,
                       skip={f.name for f in dataclasses.fields(TrainingResult)}),
    # A PPO job's result (task "ppo", core.ppo.PPOResult): final_reward_mean, final_kl (nats
    # per response), final_kl_exact, best_reward_mean, kl_coef, rollout_tokens_per_s, ...
    **_optional_fields(PPOResult, skip={f.name for f in dataclasses.fields(TrainingResult)}
                       | {f.name for f in dataclasses.fields(ClassificationResult)}),
)


class Health(BaseModel):
    status: Literal["ok", "degraded"]  # degraded: a part below is down (the answer is 503)
    database: bool  # whether the database answers
    broker: bool | None  # whether the broker answers; None: not checked
