"""The job runner: turns a job id into a training run, with the database as the record.

``run_job`` claims the job (a conditional update: a duplicate delivery returns quietly), opens
its texts in storage as streams, trains through :class:`DatabaseHooks` (metrics and checkpoints
written one short transaction at a time, never one transaction for the whole run), and finishes
the job as succeeded, failed or cancelled. A background heartbeat keeps ``jobs.heartbeat_at``
fresh so that :func:`store.sweep.sweep_orphans` can tell a dead worker's job from a slow one.

A worker that is shutting down sets the ``shutdown`` event given to :func:`run_job`: the engine
then stops at its next ``should_stop`` poll (every ``log_interval`` steps) with a ``last``
checkpoint, and the job goes back to queued (:func:`store.progress.requeue_interrupted`) for the
next worker to resume from that checkpoint.

No torch at import: the engine is imported inside :func:`run_job`, i.e. in the pool child.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from core.contract import CheckpointBlob, StepMetrics, TrainingError
from core.sources import CHUNK_CHARS, CorpusSources, TextSource
from core.spec import DatasetSource, JobSpec
from store.db import session_scope
from store.models import Dataset, JobStatus
from store.progress import (
    JobLost,
    claim_job,
    finish_job,
    heartbeat,
    prepare_resume,
    record_checkpoint,
    record_metrics,
    requeue_interrupted,
)
from store.settings import Settings
from store.storage import Storage

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DatabaseHooks:
    """:class:`core.contract.TrainingHooks` writing to the database and storage.

    ``should_stop`` is free: it returns a flag refreshed by every metrics flush and heartbeat
    (``cancel_requested``), or set when the job was taken from this attempt, or the
    ``shutdown`` event (the worker is shutting down)."""

    def __init__(self, job_id: str, attempt: int, factory: SessionFactory, storage: Storage,
                 keep_periodic: int, shutdown: threading.Event | None = None) -> None:
        self.job_id, self.attempt = job_id, attempt
        self._factory, self._storage, self._keep = factory, storage, keep_periodic
        self.shutdown = shutdown or threading.Event()
        self.cancel_requested = False
        self.lost = False

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        if self.lost:
            return
        try:
            with session_scope(self._factory) as s:
                cancel = record_metrics(s, self.job_id, self.attempt, rows)
            self.cancel_requested = self.cancel_requested or cancel
        except JobLost:
            self._mark_lost()

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        if self.lost:
            return
        try:
            with session_scope(self._factory) as s:
                row, stale = record_checkpoint(s, self._storage, self.job_id, self.attempt,
                                               checkpoint, self._keep)
        except JobLost:
            self._mark_lost()
            return
        for key in stale:
            self._storage.delete(key)
        log.info("job %s: %s checkpoint %s at step %d", self.job_id, row.kind.value, row.id,
                 row.step)

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

    def run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self._hooks.beat()
            except Exception:  # a transient database error must not end the run
                log.warning("heartbeat of %s failed", self._hooks.job_id, exc_info=True)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _source(source: DatasetSource, factory: SessionFactory, storage: Storage) -> TextSource:
    if source.builtin is not None:
        from core.corpora import builtin_corpus

        return TextSource.from_text(builtin_corpus(source.builtin),
                                    f"built-in corpus {source.builtin}")
    if source.id is None:
        raise TrainingError("dataset_error", "a job run by the service cannot read a 'path'")
    return _dataset_source(source.id, factory, storage)


def _dataset_source(dataset_id: str, factory: SessionFactory, storage: Storage) -> TextSource:
    """The dataset's blob as a stream, checked against the sha256 its row records whenever it
    is read to the end (``dataset_error`` on a mismatch). Raises ``TrainingError
    ("dataset_error")`` when the blob is missing."""
    with session_scope(factory) as s:
        row = s.get(Dataset, dataset_id)
        key, sha = (None, None) if row is None else (row.storage_key, row.sha256)
    if key is None or not storage.exists(key):
        raise TrainingError("dataset_error", f"dataset {dataset_id} is missing from storage")
    return TextSource(f"dataset {dataset_id}", opener=lambda: storage.open(key), sha256=sha)


def _read_dataset(dataset_id: str, factory: SessionFactory, storage: Storage) -> str:
    source = _dataset_source(dataset_id, factory, storage)
    with source.open() as reader:
        return "".join(iter(lambda: reader.read(CHUNK_CHARS), ""))


def load_sources(spec: JobSpec, factory: SessionFactory, storage: Storage) -> CorpusSources:
    """The job's texts as streams (nothing is read yet). Raises
    ``TrainingError("dataset_error")`` for a missing dataset."""
    assert spec.dataset is not None
    return CorpusSources(
        train=_source(spec.dataset, factory, storage),
        validation=None if spec.validation is None
        else _source(spec.validation, factory, storage),
        test=None if spec.test is None else _source(spec.test, factory, storage),
    )


def load_embeddings(spec: JobSpec, factory: SessionFactory, storage: Storage) -> str | None:
    """The pretrained embeddings' text (GloVe format) when the spec names a dataset for
    them. Raises ``TrainingError("dataset_error")``."""
    emb = spec.model.pretrained_embeddings
    if emb is None or emb.dataset_id is None:
        return None
    return _read_dataset(emb.dataset_id, factory, storage)


def run_job(
    job_id: str,
    *,
    session_factory: SessionFactory,
    storage: Storage,
    settings: Settings,
    worker_id: str | None = None,
    shutdown: threading.Event | None = None,
) -> JobStatus | None:
    """Run job ``job_id`` to a terminal state, or return at once if it is not queued.

    A ``TrainingError`` fails the job with its code; any other exception fails it with
    ``internal_error`` (traceback in the log). A job with a ``last``/``periodic`` checkpoint
    from an earlier attempt resumes from it (sha256 checked first).

    ``shutdown`` set (before or during the run) interrupts it: a running job saves a ``last``
    checkpoint and goes back to queued without using up an attempt; a requested cancel wins.

    Returns the status this call left the job in: None when it did nothing (not queued, or
    taken from this attempt), :attr:`JobStatus.QUEUED` when the job must be delivered again
    (the caller requeues its message)."""
    if shutdown is not None and shutdown.is_set():
        log.info("job %s: not starting, the worker is shutting down", job_id)
        return JobStatus.QUEUED
    with session_scope(session_factory) as s:
        job = claim_job(s, job_id, worker_id or default_worker_id())
        if job is None:
            return None
        attempt, spec_json = job.attempts, job.spec
    log.info("job %s: attempt %d started", job_id, attempt)
    spec = JobSpec.model_validate(spec_json)
    hooks = DatabaseHooks(job_id, attempt, session_factory, storage,
                          spec.training.keep_checkpoints, shutdown)
    outcome = _train(spec, hooks, session_factory, storage, settings)
    if hooks.lost:
        return None
    if _interrupted(outcome, hooks) and _requeue(hooks, session_factory, outcome):
        return JobStatus.QUEUED
    try:
        with session_scope(session_factory) as s:
            finish_job(s, job_id, attempt, outcome.status, result=outcome.result,
                       error=outcome.error)
        log.info("job %s: %s", job_id, outcome.status.value)
    except JobLost:
        log.warning("job %s was taken from attempt %d before it finished", job_id, attempt)
        return None
    return outcome.status


@dataclass
class Outcome:
    """How a run ended: the status to record and the result or the error."""

    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def _train(spec: JobSpec, hooks: DatabaseHooks, factory: SessionFactory, storage: Storage,
           settings: Settings) -> Outcome:
    """Prepare the resume, open the texts and train (the engine tokenises them into the token
    cache, ``settings.cache_dir``, or reuses an earlier job's files), with a background
    heartbeat. Never raises: a failure is an :class:`Outcome` with an error."""
    job_id = hooks.job_id
    beat = _Heartbeat(hooks, settings.heartbeat_interval_s)
    try:
        with session_scope(factory) as s:
            resume_from, stale = prepare_resume(s, storage, job_id)
        for key in stale:
            storage.delete(key)
        sources = load_sources(spec, factory, storage)
        embeddings = load_embeddings(spec, factory, storage)
        beat.start()
        from worker.engine.trainer import train_sources  # torch: only here, in the pool child

        result = train_sources(spec, sources, hooks, resume_from=resume_from,
                               cache_dir=settings.cache_dir, embeddings=embeddings)
        cancelled = result.stop_reason == "cancelled"
        return Outcome(JobStatus.CANCELLED if cancelled else JobStatus.SUCCEEDED,
                       result=result.as_dict())
    except TrainingError as exc:
        log.warning("job %s failed: %s: %s", job_id, exc.code, exc.message)
        return Outcome(JobStatus.FAILED, error=exc.as_dict())
    except Exception as exc:
        log.exception("job %s: internal error", job_id)
        return Outcome(JobStatus.FAILED,
                       error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        if beat.is_alive():
            beat.stop()


def _interrupted(outcome: Outcome, hooks: DatabaseHooks) -> bool:
    """The run stopped because the worker is shutting down, not because of a cancel."""
    return (outcome.status == JobStatus.CANCELLED and not hooks.cancel_requested
            and hooks.shutdown.is_set())


def _requeue(hooks: DatabaseHooks, factory: SessionFactory, outcome: Outcome) -> bool:
    """Put an interrupted job back to queued; False when a cancel came first (or the job was
    taken): then it is finished as cancelled."""
    try:
        with session_scope(factory) as s:
            requeue_interrupted(s, hooks.job_id, hooks.attempt)
    except JobLost:
        return False
    log.info("job %s: interrupted by the worker's shutdown at step %s; queued again",
             hooks.job_id, (outcome.result or {}).get("steps"))
    return True
