"""The job runner: turns a job id into a training run, with the database as the record.

``run_job`` claims the job (a conditional update that also opens its ``job_attempts`` row: a
duplicate delivery returns quietly), opens its texts in storage as streams, trains through
:class:`DatabaseHooks` (metrics and checkpoints written one short transaction at a time, never
one transaction for the whole run), and finishes the job as succeeded, failed or cancelled,
closing the attempt. A background heartbeat keeps ``jobs.heartbeat_at`` fresh (the lease) and
refreshes ``cancel_requested`` every ``settings.heartbeat_interval_s``; the engine polls the
resulting flag after every step and between evaluation batches, so a cancel is noticed within
about one heartbeat interval plus one step or one evaluation batch.

A worker that is shutting down sets the ``shutdown`` event given to :func:`run_job`: the engine
then stops at its next poll with a ``last`` checkpoint, and the job goes back to queued
(:func:`store.progress.requeue_interrupted`) for the next worker to resume from that
checkpoint.

Database outages: every write of the runner survives a database that is unavailable for a
while (:class:`DbRetry`). A metrics flush that fails keeps its rows and sends them with the
next flush (rows are upserted by step: none lost, none duplicated); checkpoint rows, the
finish and the preparation's reads and writes retry with capped exponential backoff for up to
``DbRetry.budget_s`` seconds. Past that, the attempt is abandoned without a verdict: the job
stays ``running`` until the sweep finds its lease expired and queues it again, to resume from
its latest checkpoint. A lease lost meanwhile still ends the attempt (:class:`JobLost`).

No torch at import: the engine is imported inside :func:`run_job`, i.e. in the pool child.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from core.contract import (
    RETRYABLE,
    CheckpointBlob,
    StepMetrics,
    TrainingError,
    failure_site,
)
from core.sources import CHUNK_CHARS, CorpusSources, TextSource
from core.spec import DatasetSource, JobSpec
from store import events
from store.db import session_scope
from store.models import Dataset, JobStatus
from store.progress import (
    JobLost,
    StoredBlob,
    add_checkpoint_row,
    claim_job,
    finish_job,
    heartbeat,
    record_metrics,
    requeue_interrupted,
    resume_point,
    set_resumed_from,
    store_checkpoint_blob,
)
from store.settings import Settings
from store.storage import Storage, StorageUnavailable
from worker.integrations import MLFLOW_FINISH_S, Integrations

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]
T = TypeVar("T")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- database outages -------------------------------------------------------------------------


def is_transient_db_error(exc: BaseException) -> bool:
    """An error that says the database is unavailable (not that the statement is wrong): the
    driver's ``OperationalError`` (connection refused or lost, server shutting down, SQLite's
    "database is locked"), ``InterfaceError``, any DBAPI error that invalidated its
    connection, and the pool's timeout."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class DatabaseUnavailable(Exception):
    """The database stayed unavailable for longer than :attr:`DbRetry.budget_s`."""


@dataclass
class DbRetry:
    """Capped exponential backoff for the runner's database writes: the first retry after
    ``first_s`` seconds, each wait doubling up to ``max_s``, for at most ``budget_s`` seconds
    in all (defaults: 0.5 s, 15 s, 300 s), then :class:`DatabaseUnavailable`. Only
    :func:`is_transient_db_error` errors are retried; :class:`JobLost` and any other error
    pass through at once."""

    budget_s: float = 300.0
    first_s: float = 0.5
    max_s: float = 15.0

    def call(self, what: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.budget_s
        delay = self.first_s
        while True:
            try:
                return fn()
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(
                        f"{what}: the database was unavailable for {self.budget_s:g} s "
                        f"({type(exc).__name__}: {_first_line(exc)})") from exc
                log.warning("%s: the database is unavailable (%s); retrying in %.1f s", what,
                            _first_line(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, self.max_s)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# -- the hooks --------------------------------------------------------------------------------


class DatabaseHooks:
    """:class:`core.contract.TrainingHooks` writing to the database and storage.

    ``should_stop`` is free: it returns a flag refreshed by every metrics flush and heartbeat
    (``cancel_requested``), or set when the job was taken from this attempt, or the
    ``shutdown`` event (the worker is shutting down).

    Metric rows whose write failed because the database is unavailable stay in
    :attr:`unsent` and go with the next flush; a checkpoint first sends them (a checkpoint row
    never runs ahead of the metric rows, so a resume never leaves a gap), retrying with
    ``retry``, then writes its blob once and retries its row."""

    def __init__(self, job_id: str, attempt: int, factory: SessionFactory, storage: Storage,
                 keep_periodic: int, shutdown: threading.Event | None = None,
                 retry: DbRetry | None = None) -> None:
        self.job_id, self.attempt = job_id, attempt
        self._factory, self._storage, self._keep = factory, storage, keep_periodic
        self.shutdown = shutdown or threading.Event()
        self.retry = retry or DbRetry()
        self.cancel_requested = False
        self.lost = False
        self.unsent: list[StepMetrics] = []
        self.unsent_samples: dict[int, list[dict[str, Any]]] = {}  # step -> samples (PPO)
        self.failed_flushes = 0  # metric flushes that found the database unavailable
        # The job's TensorBoard/MLflow integrations (worker.integrations), None without any.
        self.integrations: Integrations | None = None

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        if self.lost:
            return
        self.unsent.extend(rows)
        if self.integrations is not None:
            self.integrations.on_metrics(rows)  # never raises
        try:
            self._send_metrics()
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            self.failed_flushes += 1
            log.warning("job %s: metrics flush failed, the database is unavailable (%s); "
                        "%d rows kept for the next flush", self.job_id, _first_line(exc),
                        len(self.unsent))

    def _send_metrics(self) -> None:
        """Write the unsent rows in one transaction (clears them on success). Raises the
        database's error; a lost job marks the hooks lost."""
        if self.lost or not self.unsent:
            return
        try:
            with session_scope(self._factory) as s:
                cancel = record_metrics(s, self.job_id, self.attempt, self.unsent)
        except JobLost:
            self._mark_lost()
            return
        self.unsent = []
        self.cancel_requested = self.cancel_requested or cancel

    def drain(self) -> None:
        """Send the unsent metric rows (and samples), retrying (``retry``). Raises
        :class:`DatabaseUnavailable`."""
        if self.unsent and not self.lost:
            self.retry.call(f"job {self.job_id}: metrics", self._send_metrics)
        if self.unsent_samples and not self.lost:
            self.retry.call(f"job {self.job_id}: samples", self._send_samples)

    def on_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """Store sample responses (a PPO job's, at an evaluation: ``{"prompt", "response",
        "reward", ...}``) as the job's samples at ``step`` (:func:`store.samples.
        record_samples`: a step stored again is replaced). When the database is unavailable
        they wait, like metric rows, for the next flush."""
        if self.lost:
            return
        self.unsent_samples[step] = [dict(x) for x in samples]
        try:
            self._send_samples()
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            log.warning("job %s: samples of step %d kept for the next flush, the database is "
                        "unavailable (%s)", self.job_id, step, _first_line(exc))

    def _send_samples(self) -> None:
        if self.lost or not self.unsent_samples:
            return
        from store.samples import record_samples

        try:
            with session_scope(self._factory) as s:
                cancel = False
                for step, rows in sorted(self.unsent_samples.items()):
                    cancel = record_samples(s, self.job_id, self.attempt, step, rows) or cancel
        except JobLost:
            self._mark_lost()
            return
        self.unsent_samples = {}
        self.cancel_requested = self.cancel_requested or cancel

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        if self.lost:
            return
        self.drain()
        if self.lost:
            return
        stored = store_checkpoint_blob(self._storage, self.job_id, checkpoint)
        try:
            row_id, stale = self.retry.call(
                f"job {self.job_id}: {checkpoint.kind} checkpoint row",
                lambda: self._add_row(stored))
        except JobLost:
            self._storage.delete(stored.key)
            self._mark_lost()
            return
        except BaseException:
            self._storage.delete(stored.key)  # its row was never committed
            raise
        for key in stale:
            self._storage.delete(key)
        log.info("job %s: %s checkpoint %s at step %d", self.job_id, stored.kind.value, row_id,
                 stored.step)
        if self.integrations is not None:
            self.integrations.on_checkpoint()  # TensorBoard files uploaded; never raises

    def _add_row(self, stored: StoredBlob) -> tuple[str, list[str]]:
        with session_scope(self._factory) as s:
            row, stale = add_checkpoint_row(s, self.job_id, self.attempt, stored, self._keep)
            return row.id, stale

    def should_stop(self) -> bool:
        return self.cancel_requested or self.lost or self.shutdown.is_set()

    def beat(self) -> None:
        try:
            with session_scope(self._factory) as s:
                cancel = heartbeat(s, self.job_id, self.attempt)
            self.cancel_requested = self.cancel_requested or cancel
        except JobLost:
            self._mark_lost()

    def _mark_lost(self) -> None:
        if not self.lost:
            log.warning("job %s attempt %d was taken from this worker; stopping", self.job_id,
                        self.attempt)
        self.lost = True


class _Heartbeat(threading.Thread):
    """Beats every ``interval_s`` while the engine computes (an evaluation or a slow step may
    outlast several metrics flushes)."""

    def __init__(self, hooks: DatabaseHooks, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{hooks.job_id}", daemon=True)
        self._hooks, self._interval, self._done = hooks, interval_s, threading.Event()
        self._context = contextvars.copy_context()

    def run(self) -> None:
        # In the starting thread's context: its log records carry the job id (store.logs).
        self._context.run(self._beat)

    def _beat(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self._hooks.beat()
            except Exception as exc:  # a transient database error must not end the run
                log.warning("heartbeat of %s failed: %s", self._hooks.job_id, _first_line(exc))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


# -- the job's texts --------------------------------------------------------------------------


def _source(source: DatasetSource, factory: SessionFactory, storage: Storage,
            retry: DbRetry) -> TextSource:
    if source.builtin is not None:
        from core.corpora import builtin_corpus

        return TextSource.from_text(builtin_corpus(source.builtin),
                                    f"built-in corpus {source.builtin}")
    if source.id is None:
        raise TrainingError("dataset_error", "a job run by the service cannot read a 'path'")
    return _dataset_source(source.id, factory, storage, retry)


def _dataset_source(dataset_id: str, factory: SessionFactory, storage: Storage,
                    retry: DbRetry | None = None) -> TextSource:
    """The dataset's blob as a stream, checked against the sha256 its row records whenever it
    is read to the end (``dataset_error`` on a mismatch). Raises ``TrainingError
    ("dataset_error")`` when the blob is missing."""

    def row() -> tuple[str | None, str | None]:
        with session_scope(factory) as s:
            d = s.get(Dataset, dataset_id)
            return (None, None) if d is None else (d.storage_key, d.sha256)

    key, sha = (retry or DbRetry()).call(f"dataset {dataset_id}", row)
    if key is None or not storage.exists(key):
        raise TrainingError("dataset_error", f"dataset {dataset_id} is missing from storage")
    return TextSource(f"dataset {dataset_id}", opener=lambda: storage.open(key), sha256=sha)


def _read_dataset(dataset_id: str, factory: SessionFactory, storage: Storage,
                  retry: DbRetry | None = None) -> str:
    source = _dataset_source(dataset_id, factory, storage, retry)
    with source.open() as reader:
        return "".join(iter(lambda: reader.read(CHUNK_CHARS), ""))


def load_sources(spec: JobSpec, factory: SessionFactory, storage: Storage,
                 retry: DbRetry | None = None) -> CorpusSources:
    """The job's texts as streams (nothing is read yet). Raises
    ``TrainingError("dataset_error")`` for a missing dataset."""
    assert spec.dataset is not None
    r = retry or DbRetry()
    return CorpusSources(
        train=_source(spec.dataset, factory, storage, r),
        validation=None if spec.validation is None
        else _source(spec.validation, factory, storage, r),
        test=None if spec.test is None else _source(spec.test, factory, storage, r),
    )


def load_embeddings(spec: JobSpec, factory: SessionFactory, storage: Storage,
                    retry: DbRetry | None = None) -> str | None:
    """The pretrained embeddings' text (GloVe format) when the spec names a dataset for
    them. Raises ``TrainingError("dataset_error")``."""
    emb = spec.model.pretrained_embeddings
    if emb is None or emb.dataset_id is None:
        return None
    return _read_dataset(emb.dataset_id, factory, storage, retry)


# -- running a job ----------------------------------------------------------------------------


def run_job(
    job_id: str,
    *,
    session_factory: SessionFactory,
    storage: Storage,
    settings: Settings,
    worker_id: str | None = None,
    shutdown: threading.Event | None = None,
    db_retry: DbRetry | None = None,
) -> JobStatus | None:
    """Run job ``job_id`` to a terminal state, or return at once if it is not queued.

    A ``TrainingError`` fails the job with its code; any other exception fails it with
    ``internal`` (traceback in the log); either way ``error`` is ``{code, message, retryable,
    phase, step}``. After a failure the process's memory is released (garbage collection,
    the CUDA cache) so that it can take the next job. A job with a ``last``/``periodic``
    checkpoint from an earlier attempt resumes from it (sha256 checked first), and the
    attempt records that step (``resumed_from_step``).

    ``shutdown`` set (before or during the run) interrupts it: a running job saves a ``last``
    checkpoint and goes back to queued without using up an attempt; a requested cancel wins.
    A cancel that arrives after the run ended but before the job is finished still wins
    (:func:`store.progress.finish_job`): the job ends ``cancelled``.

    ``db_retry``: how long to wait out a database outage (:class:`DbRetry`, default 300 s).

    Returns the status this call left the job in: None when it did nothing (not queued, or
    taken from this attempt, or abandoned to the sweep because the database stayed
    unavailable), :attr:`JobStatus.QUEUED` when the job must be delivered again (the caller
    requeues its message)."""
    if shutdown is not None and shutdown.is_set():
        log.info("job %s: not starting, the worker is shutting down", job_id)
        return JobStatus.QUEUED
    retry = db_retry or DbRetry()
    worker = worker_id or default_worker_id()
    events.configure(settings)  # where this job's events go (store.events, after each commit)

    def claim() -> tuple[int, dict[str, Any]] | None:
        with session_scope(session_factory) as s:
            job = claim_job(s, job_id, worker, settings.quota_running_jobs)
            return None if job is None else (job.attempts, dict(job.spec))

    claimed = retry.call(f"job {job_id}: claim", claim)  # DatabaseUnavailable: not claimed
    if claimed is None:
        return None
    attempt, spec_json = claimed
    log.info("job %s: attempt %d started on %s", job_id, attempt, worker)
    keep = int((spec_json.get("training") or {}).get("keep_checkpoints") or 3)
    hooks = DatabaseHooks(job_id, attempt, session_factory, storage, keep, shutdown, retry)
    hooks.integrations = _start_integrations(spec_json, job_id, storage, settings,
                                             session_factory)
    outcome = _train(spec_json, hooks, session_factory, storage, settings)
    _end_integrations(hooks, outcome)
    if outcome.error is not None and "torch" in sys.modules:
        from worker.engine.trainer import release_memory

        release_memory()
    if hooks.lost:
        return None
    if outcome.abandoned:
        log.error("job %s: attempt %d abandoned: %s; the sweep will queue it again once its "
                  "lease expires", job_id, attempt, outcome.abandoned)
        return None
    if _interrupted(outcome, hooks) and _requeue(hooks, session_factory, outcome):
        return JobStatus.QUEUED
    if _retry_now(outcome) and _retry_attempt(hooks, session_factory, settings, outcome):
        return JobStatus.QUEUED
    return _finish(hooks, session_factory, outcome)


def _start_integrations(spec_json: dict[str, Any], job_id: str, storage: Storage,
                        settings: Settings, factory: SessionFactory) -> Integrations | None:
    """The job's integrations (``spec.integrations``), None when it has none (or its spec
    does not validate: :func:`_train` fails the job for that)."""
    if not spec_json.get("integrations"):
        return None
    try:
        spec = JobSpec.model_validate(spec_json)
    except ValidationError:
        return None
    return Integrations(spec, job_id, storage, settings, factory)


def _end_integrations(hooks: DatabaseHooks, outcome: Outcome) -> None:
    """End the integrations (the run's last TensorBoard files, MLflow's best checkpoint and
    run status), renewing the lease meanwhile; their warnings go into the result's
    ``warnings``. An interrupted or abandoned attempt leaves the MLflow run open."""
    integrations = hooks.integrations
    if integrations is None:
        return
    ended = not (hooks.lost or outcome.abandoned or _interrupted(outcome, hooks))
    warnings = integrations.finish(outcome.status if ended else None, hooks.beat,
                                   timeout_s=MLFLOW_FINISH_S if ended else 5.0)
    if warnings and outcome.result is not None:
        outcome.result["warnings"] = [*outcome.result.get("warnings", []), *warnings]
    elif warnings:
        log.warning("job %s: integration warnings: %s", hooks.job_id, warnings)


def _finish(hooks: DatabaseHooks, factory: SessionFactory, outcome: Outcome
            ) -> JobStatus | None:
    """Send the unsent metric rows and finish the job with ``outcome`` (retrying through an
    outage); the status it ended in, or None when it was taken from this attempt or the
    database stayed unavailable."""
    job_id, attempt = hooks.job_id, hooks.attempt

    def finish() -> JobStatus:
        with session_scope(factory) as s:
            return finish_job(s, job_id, attempt, outcome.status, result=outcome.result,
                              error=outcome.error)

    try:
        hooks.drain()
        status = hooks.retry.call(f"job {job_id}: finish", finish)
    except JobLost:
        log.warning("job %s was taken from attempt %d before it finished", job_id, attempt)
        return None
    except DatabaseUnavailable as exc:
        log.error("job %s: attempt %d could not record its end (%s); the sweep will queue it "
                  "again once its lease expires", job_id, attempt, exc)
        return None
    log.info("job %s: %s", job_id, status.value)
    return status


@dataclass
class Outcome:
    """How a run ended: the status to record and the result or the error. ``abandoned``: why
    nothing can be recorded (the database stayed unavailable), else None."""

    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    abandoned: str | None = None


def internal_message(exc: BaseException) -> str:
    """The stored message of a job that an unexpected exception stopped: the exception's class
    only, never its text (which can name a server's host and port, a file path or SQL); the
    text and the traceback go to the worker's log, under the job's id."""
    return (f"an internal error stopped the job ({type(exc).__name__}); the worker's log has "
            "the details under this job's id. Submitting it again may work; report it if it "
            "happens again")


def _error(exc: BaseException, code: str, message: str) -> dict[str, Any]:
    """``{code, message, retryable, phase, step}``, the phase and step from where the engine
    was (``prepare`` when it had not started)."""
    phase, step = failure_site(exc)
    if isinstance(exc, TrainingError):
        return {**exc.as_dict(), "phase": phase or "prepare"}
    return {"code": code, "message": message, "retryable": RETRYABLE[code],
            "phase": phase or "prepare", "step": step}


def with_service_bounds(spec: JobSpec, settings: Settings) -> JobSpec:
    """``spec`` with its checkpoint bounds capped by the service's
    (``LMFORGE_CHECKPOINT_EVERY_STEPS``, ``LMFORGE_CHECKPOINT_EVERY_S``): a job may checkpoint
    more often than the service requires, never less (a null bound in the spec means "none of
    its own"), so every job the service runs stays resumable."""
    t = spec.training
    steps = min(t.checkpoint_interval or settings.checkpoint_every_steps,
                settings.checkpoint_every_steps)
    seconds = min(t.checkpoint_every_s or settings.checkpoint_every_s, settings.checkpoint_every_s)
    if (steps, seconds) == (t.checkpoint_interval, t.checkpoint_every_s):
        return spec
    training = t.model_copy(update={"checkpoint_interval": steps, "checkpoint_every_s": seconds})
    return spec.model_copy(update={"training": training})


def _train(spec_json: dict[str, Any], hooks: DatabaseHooks, factory: SessionFactory,
           storage: Storage, settings: Settings) -> Outcome:
    """Validate the spec, prepare the resume (recording its step on the attempt), open the
    texts and train (the engine tokenises them into the token cache, ``settings.cache_dir``,
    or reuses an earlier job's files), with a background heartbeat. Never raises: a failure
    is an :class:`Outcome` with an error."""
    job_id, retry = hooks.job_id, hooks.retry
    beat = _Heartbeat(hooks, settings.heartbeat_interval_s)
    try:
        try:
            spec = JobSpec.model_validate(spec_json)
        except ValidationError as exc:
            raise TrainingError("invalid_spec", f"the stored spec is not valid: {exc}",
                                phase="prepare") from exc
        spec = with_service_bounds(spec, settings)
        beat.start()

        def prepare() -> tuple[bytes | None, int | None]:
            with session_scope(factory) as s:
                point = resume_point(s, storage, job_id)
                set_resumed_from(s, job_id, hooks.attempt, point.step)
            for key in point.stale:
                storage.delete(key)
            return point.data, point.step

        resume_from, step = retry.call(f"job {job_id}: resume", prepare)
        if step is not None:
            log.info("job %s: resuming from the checkpoint at step %d", job_id, step)
        result = _run_engine(spec, hooks, factory, storage, settings, retry, resume_from)
        cancelled = result["stop_reason"] == "cancelled"
        return Outcome(JobStatus.CANCELLED if cancelled else JobStatus.SUCCEEDED,
                       result=result)
    except TrainingError as exc:
        error = _error(exc, exc.code, exc.message)
        log.warning("job %s failed: %s (%s, step %s): %s", job_id, exc.code, error["phase"],
                    error["step"], exc.message)
        return Outcome(JobStatus.FAILED, error=error)
    except DatabaseUnavailable as exc:
        return Outcome(JobStatus.FAILED, abandoned=str(exc))
    except Exception as exc:
        return _unexpected(job_id, exc)
    finally:
        if beat.is_alive():
            beat.stop()


def _unexpected(job_id: str, exc: Exception) -> Outcome:
    """The outcome of an exception that is not a :class:`TrainingError`: a database outage
    outside the retries (the token cache, say) abandons the attempt to the sweep; an outage of
    the object store is ``storage_unavailable`` (retried at once, :data:`RETRY_NOW_CODES`);
    anything else is a bug, ``internal``."""
    if is_transient_db_error(exc):
        return Outcome(JobStatus.FAILED, abandoned=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, StorageUnavailable):
        log.warning("job %s: %s", job_id, exc)
        return Outcome(JobStatus.FAILED, error=_error(
            exc, "storage_unavailable",
            f"{exc}. The job is queued again to resume from its last checkpoint (up to "
            f"LMFORGE_MAX_ATTEMPTS attempts); check the object store's address "
            f"(AWS_ENDPOINT_URL), credentials and bucket (LMFORGE_STORAGE_URL)."))
    log.exception("job %s: internal error", job_id)
    return Outcome(JobStatus.FAILED, error=_error(exc, "internal", internal_message(exc)))


def _run_engine(spec: JobSpec, hooks: DatabaseHooks, factory: SessionFactory,
                storage: Storage, settings: Settings, retry: DbRetry,
                resume_from: bytes | None) -> dict[str, Any]:
    """Open the job's data and train (a language model, or a text classifier for
    ``task: "classify"``: :mod:`worker.classify_job`; PPO fine-tuning for ``task: "ppo"``:
    :mod:`worker.ppo_job`); the result as stored."""
    if spec.task == "ppo":
        from worker.ppo_job import train_ppo_job  # torch: in the pool child

        return train_ppo_job(spec, hooks, factory, storage, retry, resume_from).as_dict()
    if spec.task == "classify":
        from worker.classify_job import train_classify_job  # torch: in the pool child

        return train_classify_job(spec, hooks, factory, storage, retry,
                                  resume_from).as_dict()
    sources = load_sources(spec, factory, storage, retry)
    embeddings = load_embeddings(spec, factory, storage, retry)
    if spec.resources.gpus > 1:  # data-parallel: this process is rank 0 (worker.ddp_rank)
        from worker.ddp_rank import train_data_parallel  # torch: in the pool child

        return train_data_parallel(spec, sources, hooks, resume_from=resume_from,
                                   cache_dir=settings.cache_dir,
                                   embeddings=embeddings).as_dict()
    from worker.engine.trainer import train_sources  # torch: only here, in the pool child

    result = train_sources(spec, sources, hooks, resume_from=resume_from,
                           cache_dir=settings.cache_dir, embeddings=embeddings)
    return result.as_dict()


def _interrupted(outcome: Outcome, hooks: DatabaseHooks) -> bool:
    """The run stopped because the worker is shutting down, not because of a cancel."""
    return (outcome.status == JobStatus.CANCELLED and not hooks.cancel_requested
            and hooks.shutdown.is_set())


#: Failures of the moment that the worker retries at once, as a new attempt resumed from the
#: last checkpoint: a data-parallel job lost one of its other processes, or the object store
#: could not be reached.
RETRY_NOW_CODES = frozenset({"rank_failed", "storage_unavailable"})


def _retry_now(outcome: Outcome) -> bool:
    """The attempt failed with one of :data:`RETRY_NOW_CODES`."""
    return outcome.error is not None and outcome.error.get("code") in RETRY_NOW_CODES


def _retry_attempt(hooks: DatabaseHooks, factory: SessionFactory, settings: Settings,
                   outcome: Outcome) -> bool:
    """Put a job whose attempt failed with one of :data:`RETRY_NOW_CODES` back to queued, to
    resume from its last checkpoint on its next attempt, as the sweep does for a job whose
    worker died: the attempt is closed as ``failed`` with the error and counts toward
    ``LMFORGE_MAX_ATTEMPTS``. False (the caller fails the job with that error) when the
    attempts are used up, a cancel was requested, or the job is not this attempt's."""
    from store.models import Job, utcnow
    from store.progress import end_attempt
    from store.status import transition
    from store.sweep import counted_attempts

    def requeue() -> bool:
        with session_scope(factory) as s:
            job = s.get(Job, hooks.job_id)
            if (job is None or job.attempts != hooks.attempt or job.cancel_requested
                    or counted_attempts(job) >= settings.max_attempts):
                return False
            transition(s, hooks.job_id, JobStatus.QUEUED, expect=[JobStatus.RUNNING],
                       where=[Job.attempts == hooks.attempt, Job.cancel_requested.is_(False)],
                       worker_id=None, enqueued_at=utcnow())
            end_attempt(s, hooks.job_id, hooks.attempt, "failed", outcome.error)
            return True

    try:
        hooks.drain()
        requeued = hooks.retry.call(f"job {hooks.job_id}: requeue", requeue)
    except Exception as exc:  # a conflict or an outage: fail it instead (or leave it)
        log.warning("job %s: could not queue it again after %s: %s",
                    hooks.job_id, (outcome.error or {}).get("code"), _first_line(exc))
        return False
    if requeued:
        log.warning("job %s: %s; queued again (attempt %d of LMFORGE_MAX_ATTEMPTS=%d)",
                    hooks.job_id, (outcome.error or {}).get("message"), hooks.attempt,
                    settings.max_attempts)
    return requeued


def _requeue(hooks: DatabaseHooks, factory: SessionFactory, outcome: Outcome) -> bool:
    """Put an interrupted job back to queued (its attempt closed as ``interrupted``); False
    when a cancel came first (or the job was taken): then it is finished as cancelled."""

    def requeue() -> None:
        with session_scope(factory) as s:
            requeue_interrupted(s, hooks.job_id, hooks.attempt)

    try:
        hooks.drain()
        hooks.retry.call(f"job {hooks.job_id}: requeue", requeue)
    except (JobLost, DatabaseUnavailable):
        return False
    log.info("job %s: interrupted by the worker's shutdown at step %s; queued again",
             hooks.job_id, (outcome.result or {}).get("steps"))
    return True
