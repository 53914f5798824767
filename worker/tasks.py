"""Celery tasks: shells that turn an id into a call of a plain, testable function.

Resources (engine, storage) are built lazily per process: a pool child never reuses database
connections inherited from its parent.
"""

from __future__ import annotations

import logging
import os
from functools import cache

from celery.exceptions import Reject
from sqlalchemy.orm import Session, sessionmaker

from store.db import make_engine, make_session_factory
from store.models import JobStatus
from store.queue import TRAIN_TASK, CeleryEnqueuer
from store.settings import get_settings
from store.storage import LocalStorage
from store.sweep import sweep_and_requeue
from worker.celery_app import SHUTDOWN, celery
from worker.runner import run_job

log = logging.getLogger(__name__)


@cache
def _session_factory(pid: int) -> sessionmaker[Session]:
    # Keyed by pid: a forked child builds its own engine instead of sharing the parent's
    # connections (and keeps the parent's entry referenced, so it never closes them).
    return make_session_factory(make_engine(get_settings().sqlalchemy_url))


def session_factory() -> sessionmaker[Session]:
    return _session_factory(os.getpid())


@celery.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Run job ``job_id`` (see :func:`worker.runner.run_job`); a duplicate delivery of a job
    already claimed returns at once.

    When the worker shuts down, the job is interrupted (``last`` checkpoint, back to queued)
    and its message, not acknowledged yet (late acks), is rejected with requeue so that the
    next worker resumes it. Should the main process not handle the reject before it exits,
    the cold shutdown restores the unacknowledged message instead: either way, once."""
    settings = get_settings()
    status = run_job(job_id, session_factory=session_factory(),
                     storage=LocalStorage(settings.storage_dir), settings=settings,
                     shutdown=SHUTDOWN)
    if status == JobStatus.QUEUED:
        raise Reject("the worker is shutting down", requeue=True)


def sweep_orphaned_jobs() -> list[str]:
    """Re-enqueue the jobs of dead workers (called by the worker's ``OrphanSweep`` step)."""
    settings = get_settings()
    ids = sweep_and_requeue(session_factory(), CeleryEnqueuer(celery), settings)
    if ids:
        log.warning("re-enqueued orphaned jobs: %s", ", ".join(ids))
    return ids
