"""The runner's side of a job in the database: claim, heartbeat, metrics, checkpoints, resume,
finish, and requeue after a worker shutdown (the sweeps are in :mod:`store.sweep`).

Every write of a running job is fenced by its attempt number (``jobs.attempts``, incremented by
each claim): a worker that lost its job to the sweep (it stopped heartbeating, then woke up)
gets :class:`JobLost` instead of overwriting the new attempt's rows.

Each attempt is recorded in ``job_attempts`` (:class:`store.models.JobAttempt`): the claim
opens it, :func:`set_resumed_from` records the checkpoint step it resumed from, and
:func:`finish_job` / :func:`requeue_interrupted` close it with its outcome (the sweeps in
:mod:`store.sweep` close those of dead workers).

Metric rows are keyed by (job, step) and written as upserts: a step reported again (a flush
retried after an ambiguous commit, or a resumed run re-reporting the step whose validation
was interrupted) replaces its row, never duplicates it.

Helpers take the caller's session and never commit. Those that replace checkpoints return the
storage keys of the replaced blobs: delete them after the commit, never before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from core.contract import CheckpointBlob, MetricRow
from core.errors import Conflict, NotFound
from store.events import checkpoint_data, publish_on_commit, publish_status_on_commit
from store.models import (
    ApiKey,
    Checkpoint,
    CheckpointKind,
    Job,
    JobAttempt,
    JobStatus,
    Metric,
    new_id,
    utcnow,
)
from store.status import transition
from store.storage import BlobCorrupt, Storage, sha256_hex

log = logging.getLogger(__name__)

S = JobStatus


class JobLost(Exception):
    """The job is no longer this attempt's: it was swept back to the queue or finished."""


def _is_admin_principal(session: Session, name: str) -> bool:
    """Whether principal ``name`` holds a live admin key (admins are exempt from quotas)."""
    return session.scalar(select(func.count()).select_from(ApiKey).where(
        ApiKey.name == name, ApiKey.is_admin.is_(True), ApiKey.revoked_at.is_(None))) != 0


def _over_running_quota(session: Session, job_id: str, running_limit: int) -> bool:
    """Whether the owner of ``job_id`` already runs ``running_limit`` jobs (0: no limit; jobs
    without an owner and admins' jobs are exempt). On PostgreSQL a transaction-level advisory
    lock per owner serialises the count with the claim that follows, so two workers cannot
    both take the last slot; SQLite serialises writers already."""
    if running_limit <= 0:
        return False
    owner = session.scalar(select(Job.owner_id).where(Job.id == job_id))
    if owner is None or _is_admin_principal(session, owner):
        return False
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(
            func.hashtextextended("lmforge-running-quota:" + owner, 0))))
    running = session.scalar(select(func.count()).select_from(Job).where(
        Job.owner_id == owner, Job.status == S.RUNNING)) or 0
    return running >= running_limit


def claim_job(session: Session, job_id: str, worker_id: str,
              running_limit: int = 0) -> Job | None:
    """queued -> running for this worker (``UPDATE ... WHERE id = :id AND status = 'queued'``)
    and the attempt recorded (:func:`start_attempt`) in the same transaction; None when the
    job is unknown or another delivery already holds it.

    ``running_limit`` (``LMFORGE_QUOTA_RUNNING_JOBS``; 0: none) is the most jobs one principal
    may run at once: past it the job is not claimed and stays ``queued`` (its message is
    consumed; the queued sweep delivers it again after ``LMFORGE_REQUEUE_AFTER_S``), so a
    principal's extra jobs wait rather than fail."""
    now = utcnow()
    if _over_running_quota(session, job_id, running_limit):
        log.info("not claiming %s yet: its owner runs LMFORGE_QUOTA_RUNNING_JOBS=%d jobs",
                 job_id, running_limit)
        return None
    try:
        transition(
            session, job_id, S.RUNNING, expect=[S.QUEUED],
            started_at=func.coalesce(Job.started_at, now), heartbeat_at=now,
            attempts=Job.attempts + 1, worker_id=worker_id,
        )
    except (Conflict, NotFound) as exc:
        log.info("not claiming %s: %s", job_id, exc)
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    start_attempt(session, job_id, job.attempts, worker_id)
    publish_status_on_commit(session, job)  # the event stream (store.events), after commit
    return job


def start_attempt(session: Session, job_id: str, attempt: int, worker: str | None) -> None:
    """Record attempt ``attempt`` of ``job_id`` (outcome ``running``) in ``job_attempts``
    (attempt numbers are never reused; a row written again is replaced whole)."""
    session.merge(JobAttempt(job_id=job_id, attempt=attempt, worker=worker, started_at=utcnow(),
                             ended_at=None, resumed_from_step=None, outcome="running",
                             error=None))


def set_resumed_from(session: Session, job_id: str, attempt: int, step: int | None) -> None:
    """The checkpoint step attempt ``attempt`` resumed from (None: it started from step 0)."""
    session.execute(update(JobAttempt)
                    .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
                    .values(resumed_from_step=step)
                    .execution_options(synchronize_session=False))


def end_attempt(session: Session, job_id: str, attempt: int, outcome: str,
                error: dict[str, Any] | None = None) -> None:
    """Close attempt ``attempt`` of ``job_id`` with ``outcome`` (``succeeded``, ``failed``,
    ``cancelled``, ``interrupted``, ``lost``, ``out_of_memory``) unless it is already closed.
    A job with no row for that attempt (it predates ``job_attempts``) is left alone."""
    session.execute(update(JobAttempt)
                    .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt,
                           JobAttempt.ended_at.is_(None))
                    .values(ended_at=utcnow(), outcome=outcome, error=error)
                    .execution_options(synchronize_session=False))


def _fence(job_id: str, attempt: int) -> tuple[Any, ...]:
    return (Job.id == job_id, Job.status == S.RUNNING, Job.attempts == attempt)


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    """Refresh ``heartbeat_at``; returns ``cancel_requested``. Raises :class:`JobLost`."""
    res = session.execute(
        update(Job).where(*_fence(job_id, attempt)).values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise JobLost(job_id)
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def _validation_values(values: dict[str, Any]) -> dict[str, Any] | None:
    """The ``val_*`` values of a step where validation ran (any of them set), else None."""
    val = {k: v for k, v in values.items() if k.startswith("val_")}
    return val if any(v is not None for v in val.values()) else None


def _upsert_metrics(session: Session, params: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT (job_id, step) DO UPDATE SET values (SQLite, PostgreSQL); a
    plain INSERT on other backends."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pg = pg_insert(Metric)
        stmt: Any = pg.on_conflict_do_update(index_elements=[Metric.job_id, Metric.step],
                                             set_={"values": pg.excluded["values"]})
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite = sqlite_insert(Metric)
        stmt = lite.on_conflict_do_update(index_elements=[Metric.job_id, Metric.step],
                                          set_={"values": lite.excluded["values"]})
    else:
        stmt = insert(Metric)
    session.execute(stmt, params)


def record_metrics(
    session: Session, job_id: str, attempt: int, rows: Sequence[MetricRow]
) -> bool:
    """Write one row per step (its named values as JSON; a step already stored is replaced),
    update progress, latest metrics and the heartbeat in the same transaction. Returns
    ``cancel_requested``. Raises :class:`JobLost`."""
    cancel = heartbeat(session, job_id, attempt)
    if not rows:
        return cancel
    dicts = [r.as_dict() for r in rows]
    _upsert_metrics(session, [
        {"job_id": job_id, "step": d["step"], "values": {k: v for k, v in d.items() if k != "step"}}
        for d in dicts
    ])
    publish_on_commit(session, job_id, "metrics", [
        {"step": d["step"], "values": {k: v for k, v in d.items() if k != "step"}}
        for d in dicts])
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    latest = dict(dicts[-1])
    # Validation runs every eval_interval steps: carry its latest values forward so a
    # progress display always has them, with the step they belong to.
    evaluated = [(d["step"], v) for d in dicts if (v := _validation_values(d)) is not None]
    previous = job.latest_metrics or {}
    if evaluated:
        latest["val_step"], val = evaluated[-1]
        latest.update(val)
    elif previous.get("val_step") is not None:
        latest["val_step"] = previous["val_step"]
        latest.update({k: v for k, v in previous.items() if k.startswith("val_")})
    job.latest_metrics = latest
    progress = {**job.progress, "step": dicts[-1]["step"]}
    if "tokens_seen" in dicts[-1]:
        progress["tokens_seen"] = dicts[-1]["tokens_seen"]
    job.progress = progress
    return cancel


def checkpoint_key(job_id: str, checkpoint_id: str) -> str:
    return f"checkpoints/{job_id}/{checkpoint_id}.safetensors"


@dataclass
class StoredBlob:
    """A checkpoint's bytes in storage, before (or without) its row."""

    id: str
    key: str
    bytes: int
    sha256: str
    kind: CheckpointKind
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


def store_checkpoint_blob(storage: Storage, job_id: str, blob: CheckpointBlob) -> StoredBlob:
    """Write ``blob`` to storage under a new checkpoint id (atomic write, sha256). No
    database access: the row is added by :func:`add_checkpoint_row`; delete the blob
    (``storage.delete(stored.key)``) if the row is never committed."""
    ckpt_id = new_id("ckpt")
    key = checkpoint_key(job_id, ckpt_id)
    size, sha = storage.put_bytes(key, blob.data)
    return StoredBlob(ckpt_id, key, size, sha, CheckpointKind(blob.kind), blob.step,
                      dict(blob.metrics))


def record_checkpoint(
    session: Session, storage: Storage, job_id: str, attempt: int, blob: CheckpointBlob,
    keep_periodic: int,
) -> tuple[Checkpoint, list[str]]:
    """Store ``blob`` (atomic write, sha256) and its row (:func:`store_checkpoint_blob` then
    :func:`add_checkpoint_row`). Returns the row and the storage keys of the replaced blobs.
    Raises :class:`JobLost`."""
    heartbeat(session, job_id, attempt)
    return add_checkpoint_row(session, job_id, attempt,
                              store_checkpoint_blob(storage, job_id, blob), keep_periodic)


def add_checkpoint_row(
    session: Session, job_id: str, attempt: int, stored: StoredBlob, keep_periodic: int,
) -> tuple[Checkpoint, list[str]]:
    """The row of a blob already in storage, fenced by the attempt (heartbeat). ``best``
    replaces the previous best, ``last`` the previous last; ``periodic`` keeps the newest
    ``keep_periodic``. Returns the row and the storage keys of the replaced blobs. Raises
    :class:`JobLost`."""
    heartbeat(session, job_id, attempt)
    kind = stored.kind
    row = Checkpoint(id=stored.id, job_id=job_id, kind=kind, step=stored.step,
                     bytes=stored.bytes, sha256=stored.sha256, storage_key=stored.key,
                     metrics=dict(stored.metrics))
    old = list(session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == kind)
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
    ))
    keep = keep_periodic - 1 if kind == CheckpointKind.PERIODIC else 0
    stale = old[keep:]
    for r in stale:
        session.delete(r)
    session.add(row)
    session.flush()
    publish_on_commit(session, job_id, "checkpoint", checkpoint_data(row))
    return row, [r.storage_key for r in stale]


@dataclass
class ResumePoint:
    """Where an attempt starts: the checkpoint's bytes and step (None, None: from step 0),
    and the storage keys of the blobs to delete after the commit."""

    data: bytes | None
    step: int | None
    stale: list[str]


def prepare_resume(
    session: Session, storage: Storage, job_id: str
) -> tuple[bytes | None, list[str]]:
    """:func:`resume_point` as ``(checkpoint bytes or None, storage keys to delete after the
    commit)``."""
    point = resume_point(session, storage, job_id)
    return point.data, point.stale


def resume_point(session: Session, storage: Storage, job_id: str) -> ResumePoint:
    """Pick the newest ``last``/``periodic`` checkpoint of an earlier attempt whose blob matches
    its sha256, and cut everything after its step (metrics and checkpoints), so each step is
    recorded exactly once. A checkpoint that fails its sha256 is never used (it is dropped).
    Without one, the job starts over: all its metrics and checkpoints go."""
    candidates = list(session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id,
               Checkpoint.kind.in_([CheckpointKind.LAST, CheckpointKind.PERIODIC]))
        .order_by(Checkpoint.step.desc())
    ))
    data: bytes | None = None
    step = 0
    doomed: list[Checkpoint] = []
    for c in candidates:
        try:
            blob = storage.read_bytes(c.storage_key) if storage.exists(c.storage_key) else None
        except (FileNotFoundError, BlobCorrupt):  # gone meanwhile, or damaged (object store)
            blob = None
        if blob is not None and sha256_hex(blob) == c.sha256:
            data, step = blob, c.step
            break
        log.warning("checkpoint %s of %s fails its sha256 or is missing; not resuming from it",
                    c.id, job_id)
        doomed.append(c)
    later = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > step)
    )
    doomed += [c for c in later if c not in doomed]
    for c in doomed:
        session.delete(c)
    session.execute(delete(Metric).where(Metric.job_id == job_id, Metric.step > step))
    if data is None:
        job = session.get(Job, job_id)
        if job is not None:
            job.progress = {**job.progress, "step": 0, "tokens_seen": 0}
            job.latest_metrics = None
    session.flush()
    return ResumePoint(data, step if data is not None else None,
                       [c.storage_key for c in doomed])


def finish_job(
    session: Session, job_id: str, attempt: int, status: JobStatus, *,
    result: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
) -> JobStatus:
    """running -> ``status`` for this attempt, and the attempt closed with that outcome
    (:func:`end_attempt`). Returns the status the job ended in.

    ``succeeded`` is conditional on ``cancel_requested`` being false (one UPDATE, so a cancel
    accepted by the API is never lost to a concurrent finish): when a cancel arrived first, the
    job ends ``cancelled`` instead, keeping ``result`` (and its checkpoints). Raises
    :class:`JobLost` when the job is not this attempt's."""
    fence = [Job.attempts == attempt]
    try:
        if status == S.SUCCEEDED:
            try:
                transition(session, job_id, S.SUCCEEDED, expect=[S.RUNNING],
                           where=[*fence, Job.cancel_requested.is_(False)],
                           result=result, error=error)
            except Conflict:  # a cancel came first, or the job is not ours (then this fails)
                transition(session, job_id, S.CANCELLED, expect=[S.RUNNING], where=fence,
                           result=result, error=error)
                status = S.CANCELLED
                log.info("job %s: a cancel arrived before it finished; cancelled", job_id)
        else:
            transition(session, job_id, status, expect=[S.RUNNING], where=fence,
                       result=result, error=error)
    except (Conflict, NotFound) as exc:
        raise JobLost(job_id) from exc
    end_attempt(session, job_id, attempt, status.value, error)
    _publish_status(session, job_id)
    return status


def requeue_interrupted(session: Session, job_id: str, attempt: int) -> None:
    """running -> queued for an attempt that stopped because its worker is shutting down (it
    saved a ``last`` checkpoint first), closed as ``interrupted`` in ``job_attempts``. A
    graceful interruption is not the job's fault: it is counted in ``jobs.interruptions``,
    which ``LMFORGE_MAX_ATTEMPTS`` leaves out; the next claim takes the next attempt number
    (numbers are never reused, so the history keeps every attempt). ``enqueued_at`` is set in
    the same UPDATE: the caller requeues the message at once. Only when no cancel
    was requested: a cancel wins. Raises :class:`JobLost` when the job is not this attempt's
    or its cancel was requested (the caller then finishes it as cancelled)."""
    try:
        transition(session, job_id, S.QUEUED, expect=[S.RUNNING],
                   where=[Job.attempts == attempt, Job.cancel_requested.is_(False)],
                   interruptions=Job.interruptions + 1, worker_id=None,
                   enqueued_at=utcnow())
    except (Conflict, NotFound) as exc:
        raise JobLost(job_id) from exc
    end_attempt(session, job_id, attempt, "interrupted")
    _publish_status(session, job_id)


def _publish_status(session: Session, job_id: str) -> None:
    """The job's new status on its event stream once ``session`` commits (store.events)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is not None:
        publish_status_on_commit(session, job)
