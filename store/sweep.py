"""The sweeps that keep jobs from sitting in a state forever.

:func:`sweep_orphans` finds running jobs whose worker died (their lease, the heartbeat, expired)
and hands them back to the queue; :func:`sweep_and_requeue` runs it and enqueues the result.
Run by every worker's main process (``worker.celery_app.OrphanSweep``).

Helpers that take a session never commit.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.errors import Conflict
from store.db import session_scope
from store.models import Job, JobStatus, utcnow
from store.queue import Enqueuer
from store.settings import Settings
from store.status import mark_enqueue_failed, transition

log = logging.getLogger(__name__)

S = JobStatus
SessionFactory = sessionmaker[Session]


def sweep_orphans(
    session: Session, *, heartbeat_timeout_s: float, max_attempts: int,
    now: datetime | None = None,
) -> list[str]:
    """Deal with running jobs whose heartbeat is older than ``heartbeat_timeout_s`` (their
    worker died): cancel those whose cancel was requested, fail those that used
    ``max_attempts`` (``worker_lost``), and put the rest back to queued. Returns the ids to
    enqueue (after the commit)."""
    cutoff = (now or utcnow()) - timedelta(seconds=heartbeat_timeout_s)
    stale_beat = or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None))
    requeue: list[str] = []
    for job in session.scalars(select(Job).where(Job.status == S.RUNNING, stale_beat)).all():
        fence = [Job.attempts == job.attempts, stale_beat]
        try:
            if job.cancel_requested:
                transition(session, job.id, S.CANCELLED, expect=[S.RUNNING], where=fence)
            elif job.attempts >= max_attempts:
                transition(
                    session, job.id, S.FAILED, expect=[S.RUNNING], where=fence,
                    error={"code": "worker_lost",
                           "message": f"the job's worker stopped {job.attempts} times "
                                      f"(limit LMFORGE_MAX_ATTEMPTS={max_attempts})"},
                )
            else:
                transition(session, job.id, S.QUEUED, expect=[S.RUNNING], where=fence,
                           worker_id=None)
                requeue.append(job.id)
            log.warning("job %s lost its worker (attempt %d)", job.id, job.attempts)
        except Conflict:
            continue  # it heartbeated or finished meanwhile
    return requeue


def sweep_and_requeue(
    session_factory: SessionFactory, enqueuer: Enqueuer, settings: Settings
) -> list[str]:
    """Re-enqueue running jobs whose worker died (stale heartbeat); see
    :func:`sweep_orphans`. A job whose enqueue fails is marked failed
    (``enqueue_failed``), as in the API. Returns the re-enqueued ids."""
    with session_scope(session_factory) as s:
        ids = sweep_orphans(s, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                            max_attempts=settings.max_attempts)
    done = []
    for job_id in ids:
        try:
            enqueuer.enqueue(job_id)
            done.append(job_id)
        except Exception as exc:
            log.exception("re-enqueue of %s failed", job_id)
            with session_scope(session_factory) as s:
                mark_enqueue_failed(s, job_id, f"{type(exc).__name__}: {exc}")
    return done
