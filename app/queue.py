"""Enqueueing jobs by task name: the API never imports the worker's code (nor torch)."""

from __future__ import annotations

import logging
from typing import Protocol

from celery import Celery

from app.celery_config import QUEUE, TRAIN_TASK

log = logging.getLogger(__name__)


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
