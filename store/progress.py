"""The runner's side of a job in the database: claim, heartbeat, metrics, checkpoints, resume,
finish, and requeue after a worker shutdown (the sweeps are in :mod:`store.sweep`).

Every write of a running job is fenced by its attempt number (``jobs.attempts``, incremented by
each claim): a worker that lost its job to the sweep (it stopped heartbeating, then woke up)
gets :class:`JobLost` instead of overwriting the new attempt's rows.

Helpers take the caller's session and never commit. Those that replace checkpoints return the
storage keys of the replaced blobs: delete them after the commit, never before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from core.contract import CheckpointBlob, MetricRow
from core.errors import Conflict, NotFound
from store.models import (
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
from store.storage import Storage, sha256_hex

log = logging.getLogger(__name__)

S = JobStatus


class JobLost(Exception):
    """The job is no longer this attempt's: it was swept back to the queue or finished."""


def claim_job(session: Session, job_id: str, worker_id: str) -> Job | None:
    """queued -> running for this worker (``UPDATE ... WHERE id = :id AND status = 'queued'``);
    None when the job is unknown or another delivery already holds it."""
    now = utcnow()
    try:
        transition(
            session, job_id, S.RUNNING, expect=[S.QUEUED],
            started_at=func.coalesce(Job.started_at, now), heartbeat_at=now,
            attempts=Job.attempts + 1, worker_id=worker_id,
        )
    except (Conflict, NotFound) as exc:
        log.info("not claiming %s: %s", job_id, exc)
        return None
    return session.get(Job, job_id, populate_existing=True)


def start_attempt(session: Session, job_id: str, attempt: int, worker: str | None) -> None:
    """Record attempt ``attempt`` of ``job_id`` (outcome ``running``) in ``job_attempts``."""
    session.merge(JobAttempt(job_id=job_id, attempt=attempt, worker=worker, started_at=utcnow(),
                             outcome="running"))


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


def record_metrics(
    session: Session, job_id: str, attempt: int, rows: Sequence[MetricRow]
) -> bool:
    """Insert one row per step (its named values as JSON), update progress, latest metrics and
    the heartbeat in the same transaction. Returns ``cancel_requested``. Raises
    :class:`JobLost`."""
    cancel = heartbeat(session, job_id, attempt)
    if not rows:
        return cancel
    dicts = [r.as_dict() for r in rows]
    session.execute(insert(Metric), [
        {"job_id": job_id, "step": d["step"], "values": {k: v for k, v in d.items() if k != "step"}}
        for d in dicts
    ])
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


def record_checkpoint(
    session: Session, storage: Storage, job_id: str, attempt: int, blob: CheckpointBlob,
    keep_periodic: int,
) -> tuple[Checkpoint, list[str]]:
    """Store ``blob`` (atomic write, sha256) and its row. ``best`` replaces the previous best,
    ``last`` the previous last; ``periodic`` keeps the newest ``keep_periodic``. Returns the
    row and the storage keys of the replaced blobs. Raises :class:`JobLost`."""
    heartbeat(session, job_id, attempt)
    ckpt_id = new_id("ckpt")
    key = checkpoint_key(job_id, ckpt_id)
    size, sha = storage.put_bytes(key, blob.data)
    kind = CheckpointKind(blob.kind)
    row = Checkpoint(id=ckpt_id, job_id=job_id, kind=kind, step=blob.step, bytes=size,
                     sha256=sha, storage_key=key, metrics=dict(blob.metrics))
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
    return row, [r.storage_key for r in stale]


def prepare_resume(
    session: Session, storage: Storage, job_id: str
) -> tuple[bytes | None, list[str]]:
    """Pick the newest ``last``/``periodic`` checkpoint of an earlier attempt whose blob matches
    its sha256, and cut everything after its step (metrics and checkpoints), so each step is
    recorded exactly once. A checkpoint that fails its sha256 is never used (it is dropped).
    Without one, the job starts over: all its metrics and checkpoints go.

    Returns ``(checkpoint bytes or None, storage keys to delete after the commit)``."""
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
        blob = storage.read_bytes(c.storage_key) if storage.exists(c.storage_key) else None
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
    return data, [c.storage_key for c in doomed]


def finish_job(
    session: Session, job_id: str, attempt: int, status: JobStatus, *,
    result: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
) -> None:
    """running -> ``status`` for this attempt. Raises :class:`JobLost` when it is not ours."""
    try:
        transition(session, job_id, status, expect=[S.RUNNING],
                   where=[Job.attempts == attempt], result=result, error=error)
    except (Conflict, NotFound) as exc:
        raise JobLost(job_id) from exc


def requeue_interrupted(session: Session, job_id: str, attempt: int) -> None:
    """running -> queued for an attempt that stopped because its worker is shutting down (it
    saved a ``last`` checkpoint first). The attempt is given back (``attempts - 1``): a
    graceful interruption is not the job's fault and does not count toward
    ``LMFORGE_MAX_ATTEMPTS``; the next claim takes the same number again. Only when no cancel
    was requested: a cancel wins. Raises :class:`JobLost` when the job is not this attempt's
    or its cancel was requested (the caller then finishes it as cancelled)."""
    try:
        transition(session, job_id, S.QUEUED, expect=[S.RUNNING],
                   where=[Job.attempts == attempt, Job.cancel_requested.is_(False)],
                   attempts=Job.attempts - 1, worker_id=None)
    except (Conflict, NotFound) as exc:
        raise JobLost(job_id) from exc
