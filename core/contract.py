"""The engine's boundary: what goes in (texts, a spec), what comes out (metrics, checkpoints,
a result) and the one exception it raises. Pure Python: no torch, no service code.

These dataclasses are the one definition of each concept: the database stores a step's metrics
as named values (``store.models.Metric.values``), and the API's response models are derived
from :class:`StepMetrics` and :class:`TrainingResult` (``app.schemas``), so a new metric or
result field is added here and nowhere else. A new job kind reports its own named metrics
through any :class:`MetricRow` without a schema migration.

The engine never touches HTTP, SQL or Celery; the worker's runner and ``lmforge train``
implement :class:`TrainingHooks` to persist what the engine reports.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol


class CheckpointKind(enum.StrEnum):
    """``best``: lowest validation loss so far (weights only); ``last``: the end of a run or
    of an attempt (full state for exact resume); ``periodic``: every
    ``training.checkpoint_interval`` steps (full state, newest ``keep_checkpoints`` kept)."""

    BEST = "best"
    LAST = "last"
    PERIODIC = "periodic"

# Why a run ended: the stopping rule that held first, or a stop asked for through the hooks.
StopReason = Literal[
    "max_steps", "max_epochs", "max_tokens", "max_runtime_s", "early_stopping", "cancelled"
]

# Machine-readable error codes of a job that cannot run. Each comes with a message a person can
# act on, whether an unchanged retry may succeed (``retryable``), the phase it happened in and
# the step (docs/operations.md, "Failures and their codes").
ERROR_CODES = (
    "invalid_spec",  # the spec cannot be run (e.g. pretrained embeddings of the wrong width)
    "dataset_error",  # a dataset is missing, unreadable or not UTF-8 text
    "corpus_too_small",  # a split is shorter than one batch of batch_size x (seq_len + 1) tokens
    "non_finite_loss",  # loss or gradient became NaN/inf; the last good checkpoint is kept
    # the device or the host ran out of memory (a smaller batch/model fits); also set by the
    # worker when the kernel's OOM killer killed the pool process running the job
    # (worker.oom, worker.tasks)
    "out_of_memory",
    "device_unavailable",  # device "cuda" asked for on a machine without CUDA
    "invalid_checkpoint",  # a checkpoint failed its sha256 or cannot be loaded
    "timeout",  # training.max_duration_s passed; the last checkpoint is kept
    # the job's worker died LMFORGE_MAX_ATTEMPTS times: set by the orphan sweep, not the
    # engine (store.sweep.worker_lost_error, which stores its own ``retryable``)
    "worker_lost",
    # only on jobs failed before issue 8, when the broker refused the submission; no longer
    # set (such a job now stays queued and the queued sweep enqueues it)
    "enqueue_failed",
    # a process of a data-parallel job (resources.gpus > 1) other than the worker's own died
    # (killed, crashed): the job resumes from its last checkpoint on its next attempt, up to
    # LMFORGE_MAX_ATTEMPTS (worker.ddp_rank, worker.runner)
    "rank_failed",
    # the object store (LMFORGE_STORAGE_URL) could not be reached or failed a request: the job
    # resumes from its last checkpoint on its next attempt, up to LMFORGE_MAX_ATTEMPTS
    "storage_unavailable",
    # anything else: a bug (the traceback is in the worker's log). Not an outage: a database
    # outage that outlasts the runner's retries leaves the job to the sweep, unfailed. Jobs
    # failed before issue 8 carry the old name, "internal_error"
    "internal",
)

# Whether the same job, submitted again unchanged, may succeed: a fault of the machine or of
# the moment (a lost worker, a missing device, an outage) rather than of the spec or the data.
RETRYABLE: dict[str, bool] = {
    "invalid_spec": False,
    "dataset_error": False,
    "corpus_too_small": False,
    "non_finite_loss": False,
    "out_of_memory": False,
    "device_unavailable": True,
    "invalid_checkpoint": False,
    "timeout": False,
    # Set only after the service itself retried the job LMFORGE_MAX_ATTEMPTS times.
    "worker_lost": False,
    "enqueue_failed": True,
    "rank_failed": True,
    "storage_unavailable": True,
    "internal": True,
}

# Where a failure happened: reading the data and building the model, training steps,
# evaluation (validation, the fresh-state check, the test split), or saving a checkpoint.
Phase = Literal["prepare", "train", "evaluate", "checkpoint"]


class TrainingError(Exception):
    """A job that cannot run or cannot continue. ``code`` is one of :data:`ERROR_CODES`;
    ``retryable`` defaults to :data:`RETRYABLE` of the code; ``phase`` and ``step`` say where
    (None when not known yet: the runner fills them in)."""

    def __init__(self, code: str, message: str, step: int | None = None, *,
                 phase: Phase | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.step = step
        self.phase = phase
        self.retryable = RETRYABLE.get(code, False) if retryable is None else retryable

    def as_dict(self) -> dict[str, Any]:
        """``{code, message, retryable, phase, step}``: a job's ``error`` as stored and
        returned by the API."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable,
                "phase": self.phase, "step": self.step}


def mark_failure_site(exc: BaseException, phase: str, step: int | None) -> None:
    """Record on ``exc`` where the engine was when it was raised (the first record wins), so
    that the caller can explain an unexpected exception (``internal``) with its phase and
    step. A :class:`TrainingError` gets its ``phase``/``step`` filled in instead."""
    if isinstance(exc, TrainingError):
        if exc.phase is None:
            exc.phase = phase  # type: ignore[assignment]
        if exc.step is None:
            exc.step = step
    elif getattr(exc, "_lmforge_site", None) is None:
        try:
            exc._lmforge_site = (phase, step)  # type: ignore[attr-defined]
        except AttributeError:  # an exception type without a __dict__
            pass


def failure_site(exc: BaseException) -> tuple[str | None, int | None]:
    """The ``(phase, step)`` :func:`mark_failure_site` recorded on ``exc``, or (None, None)."""
    if isinstance(exc, TrainingError):
        return exc.phase, exc.step
    site = getattr(exc, "_lmforge_site", None)
    return site if site is not None else (None, None)


@dataclass
class CorpusTexts:
    """The job's text, already read and decoded.

    ``train`` is the whole dataset; when ``validation``/``test`` are None the engine holds out
    ``spec.val_fraction``/``spec.test_fraction`` of its tail (validation before test).
    ``embeddings`` is GloVe-format text when the spec asks for pretrained embeddings.
    """

    train: str
    validation: str | None = None
    test: str | None = None
    embeddings: str | None = None


@dataclass
class StepMetrics:
    """One row per optimizer step. Losses are cross-entropy in nats per token; ``val_*`` are
    set only on steps where validation ran (token-weighted over the whole split)."""

    step: int  # 1-based optimizer step
    epoch: float  # fractional passes over the training split
    train_loss: float  # nats/token, mean over this step's batch
    lr: float
    grad_norm: float  # total L2 norm before clipping
    tokens_per_s: float  # training throughput (excludes evaluation time)
    elapsed_s: float  # wall-clock seconds since the run (or resume) started
    tokens_seen: int  # training tokens consumed up to and including this step
    val_loss: float | None = None
    val_ppl: float | None = None
    val_bpc: float | None = None  # bits per character, char tokenizer only
    val_accuracy: float | None = None  # next-token top-1 accuracy in [0, 1]
    val_top5_accuracy: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetricRow(Protocol):
    """What the persistence layer stores per step: the step and named values (floats, ints or
    None). :class:`StepMetrics` is the language-model job's row; other job kinds bring their
    own names (``val_*`` names are the ones measured on validation steps)."""

    step: int

    def as_dict(self) -> dict[str, Any]: ...


@dataclass
class CheckpointBlob:
    """A checkpoint as one safetensors file (weights, optimizer/RNG state for exact resume,
    JSON config and tokenizer in the header metadata)."""

    kind: CheckpointKind
    step: int
    data: bytes
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingResult:
    steps: int
    epochs: float
    tokens_seen: int
    duration_s: float
    train_tokens_per_s: float  # training throughput excluding evaluation
    stop_reason: StopReason
    final_val_loss: float | None
    final_val_ppl: float | None
    best_val_loss: float | None
    best_val_ppl: float | None
    best_step: int | None
    vocab_size: int
    num_params: int
    test_loss: float | None = None
    test_ppl: float | None = None
    test_bpc: float | None = None
    test_accuracy: float | None = None
    test_top5_accuracy: float | None = None
    embedding_coverage: float | None = None  # share of the vocabulary found in the embeddings
    # The fresh-state check (worker.engine.trainer.fresh_state_check): the final weights'
    # loss on a slice of the training split evaluated from a zero hidden state, against the
    # mean training loss of the last steps (both nats/token).
    fresh_state_train_loss: float | None = None
    recent_train_loss: float | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)  # [{code, message}]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingHooks(Protocol):
    """Side effects of a run, injected by the caller."""

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        """Called with consecutive steps, in order, every ``training.log_interval`` steps,
        before each checkpoint and at the end. Each step is reported once per run (or
        resume), with one exception: a run resumed from a checkpoint whose validation was
        interrupted (:meth:`should_stop` during it) reports that checkpoint's step again,
        now with its ``val_*`` values; keep rows by step, the later report replacing the
        earlier."""

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        """Persist a checkpoint (``best`` replaces the previous best, ``last`` the previous
        last; ``periodic`` ones are kept up to ``training.keep_checkpoints``)."""

    def should_stop(self) -> bool:
        """Polled after every step and between evaluation batches, so it must be cheap (read a
        flag); True ends the run with stop_reason ``cancelled`` after a ``last`` checkpoint
        is saved. A stop during a validation leaves that validation to the resumed run, which
        reports the checkpoint's step again with its validation values (see
        :meth:`on_metrics`)."""


class NullHooks:
    """:class:`TrainingHooks` that keep nothing and never stop the run, for a run whose result
    is all its caller wants: the worker's warm-up (worker.preload), ranks 1..N-1 of a
    data-parallel run (rank 0 reports, and their stops come from rank 0's broadcast),
    benchmarks."""

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        pass

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        pass

    def should_stop(self) -> bool:
        return False
