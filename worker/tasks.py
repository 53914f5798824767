"""Celery tasks: shells that turn an id into a call of a plain, testable function.

Resources (engine, storage) are built lazily per process: a pool child never reuses database
connections inherited from its parent.

:class:`TrainRequest` is the train task's request object in the worker's *main* process: when
the pool process running a job dies (SIGKILL, a segfault, the out-of-memory killer), Celery
reports ``WorkerLostError`` to its ``on_failure``, and :func:`on_pool_process_lost` hands the
job back at once (or fails it as ``out_of_memory``) instead of waiting for its lease to run out.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import cache
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.exceptions import Reject
from celery.worker.request import Request
from sqlalchemy.orm import Session, sessionmaker

from store.db import make_engine, make_session_factory, session_scope
from store.logs import job_log_context
from store.models import JobStatus
from store.queue import TRAIN_TASK, CeleryEnqueuer, RedisQueueInspector
from store.settings import Settings, get_settings
from store.storage import Storage, make_storage
from store.sweep import (
    SweepResult,
    expire_lease,
    fail_attempt,
    running_attempt,
    sweep_all,
)
from worker import oom
from worker.celery_app import SHUTDOWN, celery, stopping
from worker.runner import run_job

log = logging.getLogger(__name__)


@cache
def _session_factory(pid: int) -> sessionmaker[Session]:
    # Keyed by pid: a forked child builds its own engine instead of sharing the parent's
    # connections (and keeps the parent's entry referenced, so it never closes them).
    return make_session_factory(make_engine(get_settings().sqlalchemy_url))


def session_factory() -> sessionmaker[Session]:
    return _session_factory(os.getpid())


@cache
def _storage(pid: int) -> Storage:
    # One per process (an S3 client is not shared across fork); make_storage raises at once
    # for a malformed LMFORGE_STORAGE_URL.
    return make_storage(get_settings())


def storage() -> Storage:
    """This process's blob storage (``store.storage.make_storage``: local files or S3)."""
    return _storage(os.getpid())


@cache
def _memory_cgroup(pid: int) -> oom.MemoryCgroup | None:
    return oom.memory_cgroup()


def memory_cgroup() -> oom.MemoryCgroup | None:
    """This process's memory cgroup (that of the pool processes it forks), found once."""
    return _memory_cgroup(os.getpid())


class TrainRequest(Request):
    """The train task's request in the worker's main process. Notes the memory cgroup's
    OOM-kill count when the message arrives, and on ``WorkerLostError`` (the pool process
    running the task died) calls :func:`on_pool_process_lost` before Celery's own handling
    (which, with ``task_reject_on_worker_lost``, puts the message back in the queue; that
    duplicate finds the job claimed or requeued and does nothing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cgroup = memory_cgroup()
        self.oom_kills_before = cgroup.oom_kills() if cgroup is not None else None

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and self.worker_pid and self.args:
            try:
                on_pool_process_lost(str(self.args[0]), int(self.worker_pid),
                                     oom.exit_signal(str(exc)), self.oom_kills_before)
            except Exception:  # the database may be down: then the lease runs out instead
                log.warning("could not hand back the job of dead pool process %s",
                            self.worker_pid, exc_info=True)
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)


@celery.task(name=TRAIN_TASK, Request=TrainRequest)
def train_job(job_id: str) -> None:
    """Run job ``job_id`` (see :func:`worker.runner.run_job`); a duplicate delivery of a job
    already claimed returns at once.

    When the worker shuts down, the job is interrupted (``last`` checkpoint, back to queued)
    and its message, not acknowledged yet (late acks), is rejected with requeue so that the
    next worker resumes it (``store.progress.requeue_interrupted`` set ``enqueued_at`` to now
    as it queued the job, so the queued sweep leaves it alone for ``requeue_after_s``). Should
    the main process not handle the reject before it exits, the cold shutdown restores the
    unacknowledged message instead: either way, once."""
    settings = get_settings()
    factory = session_factory()
    with job_log_context(job_id):  # every log record of the run carries the job id
        status = run_job(job_id, session_factory=factory,
                         storage=storage(), settings=settings,
                         shutdown=SHUTDOWN)
    if status == JobStatus.QUEUED:
        raise Reject("the job is queued again (the worker is shutting down, or the attempt is "
                     "retried)", requeue=True)


def pool_worker_id(pid: int) -> str:
    """The ``worker_id`` a job claimed by pool process ``pid`` of this machine carries (the
    format of :func:`worker.runner.default_worker_id`)."""
    return f"{socket.gethostname()}:{pid}"


def on_pool_process_lost(
    job_id: str, pid: int, signum: int | None, oom_kills_before: int | None
) -> JobStatus | None:
    """Pool process ``pid`` died (exit signal ``signum``, None if it exited) while it ran
    the task of ``job_id``. Called in the worker's main process.

    - Killed by the out-of-memory killer (:func:`worker.oom.killed_by_oom`: SIGKILL while the
      cgroup's ``oom_kill`` count rose above ``oom_kills_before``): the job fails at once as
      ``out_of_memory`` (not retryable; retrying would kill the next process too).
    - Otherwise its lease is expired (fenced on the attempt) and the sweeps run now, so the
      job is queued again, or fails with ``worker_lost`` past ``LMFORGE_MAX_ATTEMPTS``,
      without waiting for the lease to run out.

    Does nothing when the job was not running on that process (a duplicate delivery, or it
    had finished). Returns the job's new status (``FAILED``/``CANCELLED`` for an OOM kill,
    ``RUNNING`` when its lease was expired and the sweep ran), or None."""
    cgroup = memory_cgroup()
    after = cgroup.oom_kills() if cgroup is not None else None
    killed_by_oom = oom.killed_by_oom(signum, oom_kills_before, after)
    with session_scope(session_factory()) as s:
        attempt = running_attempt(s, job_id, pool_worker_id(pid))
        if attempt is None:
            return None
        if killed_by_oom:
            error = {"code": "out_of_memory",
                     "message": oom.describe_oom(pid, cgroup, oom_kills_before, after),
                     "retryable": False, "phase": "train"}
            status = fail_attempt(s, job_id, attempt, error, "out_of_memory")
            log.error("job %s: attempt %d killed by the out-of-memory killer; %s", job_id,
                      attempt, status and status.value)
            return status
        expired = expire_lease(s, job_id, attempt)
    log.warning("job %s: pool process %d died (signal %s) in attempt %d; handing it back",
                job_id, pid, signum, attempt)
    if expired:
        sweep_orphaned_jobs(queued=not stopping())
    return JobStatus.RUNNING if expired else None


@cache
def _inspector(redis_url: str) -> RedisQueueInspector | None:
    if redis_url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        return None
    return RedisQueueInspector(redis_url)


def sweep_orphaned_jobs(settings: Settings | None = None, *, queued: bool = True) -> SweepResult:
    """The sweeps (:func:`store.sweep.sweep_all`): re-enqueue the jobs of dead workers and,
    with ``queued``, the queued jobs whose message is lost. Called in the worker's main
    process by the ``OrphanSweep`` step and by :func:`on_pool_process_lost`. Raises when the
    database or the broker does not answer (the caller logs it; the next tick tries again)."""
    settings = settings or get_settings()
    result = sweep_all(session_factory(), CeleryEnqueuer(celery), settings,
                       _inspector(settings.redis_url), queued=queued)
    if result.orphans:
        log.warning("re-enqueued orphaned jobs: %s", ", ".join(result.orphans))
    return result
