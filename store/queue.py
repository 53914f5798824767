"""The one Celery configuration, shared by the producer (API) and the worker, and the API's
enqueuer (by task name: the API never imports the worker's code, nor torch).

Why each setting is what it is (late acks, reject on worker loss, prefetch 1, the visibility
timeout, no result backend) is in ``docs/operations.md``: in short, a killed pool child's job
is redelivered, a long job holds no other job hostage, a running job is not redelivered while
it still runs, and the database, not Celery, is the record of a job's state (a duplicate
delivery is harmless anyway: the runner claims the job in the database).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from celery import Celery

from store.settings import Settings

log = logging.getLogger(__name__)

QUEUE = "lmforge"
TRAIN_TASK = "lmforge.train_job"


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    app = Celery("lmforge", broker=settings.redis_url, include=list(include))
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={TRAIN_TASK: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # A publish to an unreachable broker fails within about a second (then the API marks
        # the job enqueue_failed) instead of retrying for minutes.
        broker_connection_timeout=2.0,
        task_publish_retry_policy={
            "max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        # After SIGTERM is remapped to SIGQUIT (REMAP_SIGTERM=SIGQUIT), the running task gets
        # this long before the message is restored to the queue.
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout_s,
    )
    return app


class Enqueuer(Protocol):
    def enqueue(self, job_id: str) -> None:
        """Hand job ``job_id`` (already committed) to the workers. Raises on failure."""
        ...

    def ping(self) -> bool:
        """Whether the broker answers."""
        ...


class CeleryEnqueuer:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def enqueue(self, job_id: str) -> None:
        self.celery.send_task(TRAIN_TASK, args=[job_id], queue=QUEUE)
        log.info("enqueued %s", job_id)

    def ping(self) -> bool:
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:  # any transport error means "not reachable"
            log.warning("broker not reachable", exc_info=True)
            return False
