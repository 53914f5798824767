"""The one Celery configuration, shared by the producer (API) and the worker.

Choices follow ``../shared/FIELD-NOTES.md`` (Celery/kombu 5.7 on Redis): late acks and reject on
worker loss so a killed pool child's job is redelivered; prefetch 1 so a long job does not hold
others hostage; a visibility timeout above the longest job (a duplicate delivery is harmless
anyway: the runner claims the job in the database). No result backend: the database is the only
record of a job's state.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from app.settings import Settings

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
