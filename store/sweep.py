"""The sweeps that keep jobs from sitting in a state forever.

- :func:`sweep_orphans` finds running jobs whose worker died (their lease, the heartbeat,
  expired) and hands them back to the queue (or fails them past ``max_attempts``), recording
  the lost attempt.
- :func:`lost_queued_jobs` finds queued jobs whose broker message is gone: never handed to
  the broker (``enqueued_at`` NULL), or handed over longer than ``requeue_after_s`` ago and no
  longer in it (a Redis restart without persistence, for one).
- :func:`claim_enqueue` is the compare-and-set that lets exactly one sweeper enqueue such a
  job: ``UPDATE jobs SET enqueued_at = :now WHERE id = :id AND status = 'queued' AND
  (enqueued_at IS NULL OR enqueued_at < :cutoff)``; the sweeper whose update changed the row
  enqueues, every other one sees rowcount 0 and leaves the job alone.
- Every enqueue goes to the job's own queue with its priority (``store.queue.stored_route``
  of its stored spec, :func:`core.routing.job_route`), and the queued sweep inspects every
  queue a queued job routes to.
- :func:`sweep_and_requeue` runs both sweeps and enqueues what they found. It runs in every
  worker's main process (``worker.celery_app.OrphanSweep``: at start, then periodically, and
  at once when a pool process dies, see ``worker.tasks``).

Helpers that take a session never commit. docs/operations.md ("Faults: queues, sweeps and
worker deaths") explains the design.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.contract import RETRYABLE
from core.errors import Conflict, NotFound
from store.db import session_scope
from store.models import Job, JobStatus, utcnow
from store.progress import end_attempt
from store.queue import QUEUE, Enqueuer, stored_route
from store.settings import Settings
from store.status import transition

log = logging.getLogger(__name__)

S = JobStatus
SessionFactory = sessionmaker[Session]


class QueueInspector(Protocol):
    def pending_job_ids(self, delivered_since: float,
                        queues: Collection[str] | None = None) -> set[str]:
        """Jobs with a message in ``queues`` of the broker, or delivered since
        ``delivered_since`` (see ``store.queue.RedisQueueInspector``)."""
        ...


def sweep_interval_s(settings: Settings) -> float:
    """How often a worker runs :func:`sweep_and_requeue` (seconds): half the shorter of the
    lease and ``requeue_after_s``, at least half a second."""
    return max(min(settings.heartbeat_timeout_s, settings.requeue_after_s) / 2, 0.5)


# -- running jobs whose worker died --------------------------------------------------------------


def _step(job: Job) -> int:
    return int((job.progress or {}).get("step") or 0)


def counted_attempts(job: Job) -> int:
    """The attempts that count toward ``LMFORGE_MAX_ATTEMPTS``: all but those handed back by
    a graceful worker shutdown."""
    return job.attempts - job.interruptions


def worker_lost_error(job: Job, max_attempts: int) -> dict[str, Any]:
    """The ``worker_lost`` error of a job whose worker died ``job.attempts -
    job.interruptions`` times (graceful shutdowns are not counted)."""
    return {"code": "worker_lost",
            "message": f"the job's worker stopped {counted_attempts(job)} times without "
                       f"finishing it "
                       f"(limit LMFORGE_MAX_ATTEMPTS={max_attempts})",
            "retryable": RETRYABLE["worker_lost"], "phase": "train", "step": _step(job)}


def sweep_orphans(
    session: Session, *, heartbeat_timeout_s: float, max_attempts: int,
    now: datetime | None = None,
) -> list[str]:
    """Deal with running jobs whose heartbeat is older than ``heartbeat_timeout_s`` seconds
    or unset (their worker died): cancel those whose cancel was requested, fail those that
    used ``max_attempts`` (``worker_lost``), and put the rest back to queued with
    ``enqueued_at`` NULL (no message yet). Each taken attempt is closed as ``lost``
    (``job_attempts``). Every update is fenced on the attempt number and the stale
    heartbeat, so a job that heartbeats or finishes meanwhile is left alone. Returns the ids
    to enqueue (after the commit, with :func:`enqueue_jobs`)."""
    cutoff = (now or utcnow()) - timedelta(seconds=heartbeat_timeout_s)
    stale_beat = or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None))
    requeue: list[str] = []
    for job in session.scalars(select(Job).where(Job.status == S.RUNNING, stale_beat)).all():
        fence = [Job.attempts == job.attempts, stale_beat]
        try:
            if job.cancel_requested:
                transition(session, job.id, S.CANCELLED, expect=[S.RUNNING], where=fence)
            elif counted_attempts(job) >= max_attempts:
                transition(session, job.id, S.FAILED, expect=[S.RUNNING], where=fence,
                           error=worker_lost_error(job, max_attempts))
            else:
                transition(session, job.id, S.QUEUED, expect=[S.RUNNING], where=fence,
                           worker_id=None, enqueued_at=None)
                requeue.append(job.id)
        except (Conflict, NotFound):
            continue  # it heartbeated or finished meanwhile
        end_attempt(session, job.id, job.attempts, "lost")
        log.warning("job %s lost its worker (attempt %d, step %d)", job.id, job.attempts,
                    _step(job))
    return requeue


def running_attempt(session: Session, job_id: str, worker_id: str) -> int | None:
    """The attempt number of ``job_id`` if it is running on ``worker_id``, else None."""
    return session.scalar(select(Job.attempts).where(
        Job.id == job_id, Job.status == S.RUNNING, Job.worker_id == worker_id))


def expire_lease(session: Session, job_id: str, attempt: int) -> bool:
    """End attempt ``attempt``'s lease now (``heartbeat_at`` NULL), so that the next
    :func:`sweep_orphans` takes the job without waiting for the lease to run out: its
    worker process is known to be dead. Fenced: does nothing (False) unless the job is
    running that attempt."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == S.RUNNING, Job.attempts == attempt)
        .values(heartbeat_at=None).execution_options(synchronize_session=False))
    return res.rowcount == 1  # type: ignore[attr-defined, no-any-return]


def fail_attempt(
    session: Session, job_id: str, attempt: int, error: dict[str, Any], outcome: str
) -> JobStatus | None:
    """Attempt ``attempt`` of a running job ended for good (e.g. its process was killed by
    the out-of-memory killer): fail the job with ``error`` (its ``step`` filled in from the
    progress), or cancel it when a cancel was requested, and close the attempt with
    ``outcome``. Fenced on the attempt: returns the new status, or None when the job is not
    running that attempt any more."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != S.RUNNING or job.attempts != attempt:
        return None
    to = S.CANCELLED if job.cancel_requested else S.FAILED
    values = {} if to == S.CANCELLED else {"error": {**error, "step": _step(job)}}
    try:
        transition(session, job_id, to, expect=[S.RUNNING], where=[Job.attempts == attempt],
                   **values)
    except (Conflict, NotFound):
        return None
    end_attempt(session, job_id, attempt, outcome, error)
    return to


# -- queued jobs whose message is lost -----------------------------------------------------------


def lost_queued_jobs(
    session: Session, *, cutoff: datetime, pending: Collection[str] | None,
) -> list[str]:
    """Queued jobs that have no message: ``enqueued_at`` NULL, or older than ``cutoff`` and
    not among ``pending`` (the ids with a message in the broker). With ``pending`` None (the
    broker cannot be inspected) only the NULL ones. Oldest first."""
    eligible: ColumnElement[bool]
    if pending is None:
        eligible = Job.enqueued_at.is_(None)
    else:
        eligible = or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff)
    ids = session.scalars(select(Job.id).where(Job.status == S.QUEUED, eligible)
                          .order_by(Job.created_at, Job.id)).all()
    return [i for i in ids if pending is None or i not in pending]


def queued_queues(session: Session) -> set[str]:
    """The queues the queued jobs route to (``store.queue.stored_route`` of each one's spec),
    with the default queue ``lmforge``."""
    specs = session.scalars(select(Job.spec).where(Job.status == S.QUEUED))
    return {QUEUE, *(stored_route(spec).queue for spec in specs)}


def claim_enqueue(session: Session, job_id: str, *, now: datetime, cutoff: datetime) -> bool:
    """The compare-and-set that makes one sweeper, and only one, enqueue ``job_id``:
    ``enqueued_at`` becomes ``now`` if the job is queued and its ``enqueued_at`` is NULL or
    older than ``cutoff``. True when this call changed the row (commit, then enqueue)."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == S.QUEUED,
               or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff))
        .values(enqueued_at=now).execution_options(synchronize_session=False))
    return res.rowcount == 1  # type: ignore[attr-defined, no-any-return]


def release_enqueue(session: Session, job_id: str, claimed_at: datetime) -> None:
    """The enqueue after :func:`claim_enqueue` failed: ``enqueued_at`` back to NULL (unless
    someone changed it since), so that the next sweep tries again at once."""
    session.execute(update(Job).where(Job.id == job_id, Job.enqueued_at == claimed_at)
                    .values(enqueued_at=None).execution_options(synchronize_session=False))


def enqueue_jobs(
    session_factory: SessionFactory, enqueuer: Enqueuer, job_ids: Collection[str], *,
    now: datetime, cutoff: datetime,
) -> tuple[list[str], list[str]]:
    """For each id: :func:`claim_enqueue` in its own transaction, then, if this call won,
    enqueue it on its route (``store.queue.stored_route`` of its stored spec). Returns
    ``(enqueued, lost_races)``. An enqueue that raises is released (:func:`release_enqueue`)
    and the rest are skipped: the broker is down, and the next
    sweep retries."""
    enqueued: list[str] = []
    lost: list[str] = []
    for job_id in job_ids:
        with session_scope(session_factory) as s:
            won = claim_enqueue(s, job_id, now=now, cutoff=cutoff)
            spec = s.scalar(select(Job.spec).where(Job.id == job_id)) if won else None
        if not won:
            lost.append(job_id)
            continue
        try:
            enqueuer.enqueue(job_id, stored_route(spec))
        except Exception:
            log.warning("enqueue of %s failed; the next sweep retries", job_id, exc_info=True)
            with session_scope(session_factory) as s:
                release_enqueue(s, job_id, now)
            break
        enqueued.append(job_id)
    return enqueued, lost


@dataclass
class SweepResult:
    """What one :func:`sweep_and_requeue` did: ``orphans`` re-enqueued after a dead worker,
    ``queued`` re-enqueued because their message was lost, ``lost_races`` left to another
    sweeper that claimed them first."""

    orphans: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    lost_races: list[str] = field(default_factory=list)

    @property
    def enqueued(self) -> list[str]:
        return self.orphans + self.queued


def sweep_queued(
    session_factory: SessionFactory, enqueuer: Enqueuer, settings: Settings,
    inspector: QueueInspector | None, now: datetime | None = None,
) -> SweepResult:
    """Enqueue again the queued jobs whose message is lost (:func:`lost_queued_jobs`, then
    :func:`enqueue_jobs`). ``inspector`` None: only jobs never handed to the broker.
    Raises what the inspector raises (the broker does not answer: nothing is enqueued)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    pending = None
    if inspector is not None:
        with session_scope(session_factory) as s:
            queues = queued_queues(s)
        pending = inspector.pending_job_ids(delivered_since=cutoff.timestamp(), queues=queues)
    with session_scope(session_factory) as s:
        ids = lost_queued_jobs(s, cutoff=cutoff, pending=pending)
    enqueued, lost = enqueue_jobs(session_factory, enqueuer, ids, now=now, cutoff=cutoff)
    if enqueued:
        log.warning("re-enqueued queued jobs whose message was lost: %s", ", ".join(enqueued))
    return SweepResult(queued=enqueued, lost_races=lost)


def sweep_and_requeue(
    session_factory: SessionFactory, enqueuer: Enqueuer, settings: Settings,
    inspector: QueueInspector | None = None, *, queued: bool = False,
) -> list[str]:
    """The sweeps, as the workers run them (:func:`sweep_all`). Returns the enqueued ids."""
    return sweep_all(session_factory, enqueuer, settings, inspector, queued=queued).enqueued


def sweep_all(
    session_factory: SessionFactory, enqueuer: Enqueuer, settings: Settings,
    inspector: QueueInspector | None = None, *, queued: bool = False,
) -> SweepResult:
    """Requeue the running jobs whose worker died (:func:`sweep_orphans`) and enqueue them at
    once; then, with ``queued``, enqueue the queued jobs whose message is lost
    (:func:`sweep_queued`, with ``inspector``). A job whose enqueue fails stays queued with
    ``enqueued_at`` NULL: the next sweep enqueues it when the broker is back. Raises the
    inspector's error after the orphans are dealt with."""
    now = utcnow()
    with session_scope(session_factory) as s:
        ids = sweep_orphans(s, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                            max_attempts=settings.max_attempts, now=now)
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    orphans, lost = enqueue_jobs(session_factory, enqueuer, ids, now=now, cutoff=cutoff)
    result = SweepResult(orphans=orphans, lost_races=lost)
    if queued:
        more = sweep_queued(session_factory, enqueuer, settings, inspector)
        result.queued, result.lost_races = more.queued, result.lost_races + more.lost_races
    return result
