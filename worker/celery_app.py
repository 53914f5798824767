"""The worker's Celery application: ``celery -A worker.celery_app worker`` (``lmforge worker``).

The configuration is :func:`app.celery_config.make_celery`, shared with the API. Nothing here
imports torch: the prefork pool forks its children after this module is loaded, and torch must
only be loaded inside the task, in the child (``../shared/FIELD-NOTES.md``).

The :class:`OrphanSweep` boot step runs :func:`worker.runner.sweep_and_requeue` in the worker's
main process at start and then every ``heartbeat_timeout_s / 2`` seconds, on the worker's own
timer (no extra thread in the process that forks).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from app.celery_config import make_celery
from app.settings import get_settings

log = logging.getLogger(__name__)

celery = make_celery(get_settings(), include=["worker.tasks"])


class OrphanSweep(bootsteps.StartStopStep):
    # After the pool: its children are forked before this step opens database connections.
    requires = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        interval = max(get_settings().heartbeat_timeout_s / 2, 1.0)
        self._sweep()
        self.tref = parent.timer.call_repeatedly(interval, self._sweep, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    @staticmethod
    def _sweep() -> None:
        from worker.tasks import sweep_orphaned_jobs

        try:
            sweep_orphaned_jobs()
        except Exception:  # the database may be down for a moment; try again next tick
            log.warning("orphan sweep failed", exc_info=True)


celery.steps["worker"].add(OrphanSweep)
