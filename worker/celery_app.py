"""The worker's Celery application: ``celery -A worker.celery_app worker`` (``lmforge worker``).

The configuration is :func:`store.queue.make_celery`, shared with the API. Nothing here
imports torch: the prefork pool forks its children after this module is loaded, and torch must
only be loaded in the child (docs/operations.md): by :mod:`worker.preload` as the child starts
(``LMFORGE_WORKER_PRELOAD``), else inside its first task.

The :class:`OrphanSweep` boot step runs the sweeps (:func:`worker.tasks.sweep_orphaned_jobs`:
jobs of dead workers, and queued jobs whose broker message is lost) in the worker's main process
at start and then every :func:`store.sweep.sweep_interval_s` seconds (half the shorter of the
lease and ``requeue_after_s``), on the worker's own timer (no extra thread in the process that
forks). Every worker runs it; the compare-and-set in :func:`store.sweep.claim_enqueue` keeps two
sweepers from enqueuing one job twice.

Shutdown while a job runs: Celery tells the pool processes nothing during a warm or a soft/cold
shutdown (checked with Celery 5.7 and REMAP_SIGTERM=SIGQUIT: the main process sleeps
``worker_soft_shutdown_timeout`` in its signal handler, its cancel sends the remapped SIGQUIT,
which pool processes ignore, and a pool process dies by SIGKILL, its parent-death signal, when
the main process exits). So the :class:`ForwardShutdown` boot step wraps the main process's
SIGTERM, SIGQUIT and SIGINT handlers to first send :data:`SHUTDOWN_SIGNAL` to every pool
process, where it sets :data:`SHUTDOWN`: the running job saves a ``last`` checkpoint at its next
``log_interval`` step, goes back to queued, and the task rejects its message with requeue.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from datetime import UTC, datetime
from functools import partial
from types import FrameType
from typing import Any

from celery import bootsteps, signals
from celery.exceptions import CPendingDeprecationWarning

from store.queue import make_celery
from store.settings import get_settings
from worker.preload import PRELOAD_TIMEOUT_S

log = logging.getLogger(__name__)

celery = make_celery(get_settings(), include=["worker.tasks"])


def _quiet_connection_loss_warning() -> None:
    """We keep running tasks through a broker outage on purpose
    (``worker_cancel_long_running_tasks_on_connection_loss=False``, store/queue.py); Celery
    warns at every connection loss that its default changes in 6.0. Installed once the
    worker's logging is set up (Celery's own ``always`` filters come first before that)."""
    warnings.filterwarnings(
        "ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
        category=CPendingDeprecationWarning)


#: Set in the main process by the first shutdown signal (:class:`ForwardShutdown`): the sweeps
#: stop, since a job the shutdown interrupts is queued again before its message goes back to
#: the broker, and a sweep in between would enqueue it a second time.
_stopping = False


def stopping() -> bool:
    """Whether this worker's main process has begun to shut down."""
    return _stopping


class OrphanSweep(bootsteps.StartStopStep):
    # After the pool: its children are forked before this step opens database connections.
    requires = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        from store.sweep import sweep_interval_s

        _quiet_connection_loss_warning()
        interval = sweep_interval_s(get_settings())
        self._sweep()
        self.tref = parent.timer.call_repeatedly(interval, self._sweep, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    @staticmethod
    def _sweep() -> None:
        from worker.tasks import sweep_orphaned_jobs

        if _stopping:
            return
        try:
            sweep_orphaned_jobs()
        except Exception as exc:  # the database or Redis may be down; try again next tick
            log.warning("sweep failed (%s: %s); trying again at the next tick",
                        type(exc).__name__, exc)


celery.steps["worker"].add(OrphanSweep)


class WorkerRegistry(bootsteps.StartStopStep):
    """Publish this worker in the worker registry (:mod:`store.workers`): its node name, the
    queues it consumes, its device class and GPUs, ``gpus_per_job`` and pid, written to Redis
    at start and every ``store.workers.REFRESH_S`` seconds on the worker's timer (the entry
    expires ``TTL_S`` seconds after the last write), deleted on a clean shutdown. The API reads
    it to say what a queued job is ``waiting_for``. A Redis outage is logged; the next tick
    writes again."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.client: Any = None
        self.info: Any = None

    def start(self, parent: Any) -> None:
        import redis

        from store.workers import (
            ENV_DEVICE,
            ENV_GPUS_PER_JOB,
            REFRESH_S,
            WorkerInfo,
            detect_device_class,
        )

        url = get_settings().redis_url
        if url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            return  # not a Redis broker: no registry
        queues = parent.app.amqp.queues.consume_from
        self.info = WorkerInfo(
            hostname=parent.hostname, queues=tuple(queues),
            device_class=os.environ.get(ENV_DEVICE) or detect_device_class(),
            gpus=os.environ.get("CUDA_VISIBLE_DEVICES"),
            gpus_per_job=int(os.environ.get(ENV_GPUS_PER_JOB) or 1), pid=os.getpid(),
            started_at=datetime.now(UTC).isoformat())
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._publish()
        self.tref = parent.timer.call_repeatedly(REFRESH_S, self._publish, priority=10)

    def _publish(self) -> None:
        from store.workers import publish

        if _stopping or self.info is None:
            return
        try:
            publish(self.client, self.info)
        except Exception as exc:  # Redis is down; the next tick writes again
            log.warning("worker registry: could not publish %s (%s: %s)", self.info.hostname,
                        type(exc).__name__, exc)

    def stop(self, parent: Any) -> None:
        from store.workers import remove

        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.client is not None and self.info is not None:
            try:
                remove(self.client, self.info)
            except Exception as exc:  # the entry expires on its own
                log.warning("worker registry: could not remove %s (%s)", self.info.hostname,
                            exc)
            self.client.close()
            self.client = None

    def terminate(self, parent: Any) -> None:
        # A cold shutdown (SIGTERM remapped to SIGQUIT) calls terminate, not stop.
        self.stop(parent)


celery.steps["worker"].add(WorkerRegistry)

#: Sent by the worker's main process to its pool processes when it begins to shut down. Not
#: SIGUSR1: billiard takes that one in pool processes for soft time limits (it raises
#: SoftTimeLimitExceeded). Pool processes ignore SIGTERM, SIGQUIT and SIGINT.
SHUTDOWN_SIGNAL = signal.SIGUSR2
#: Set in a pool process by :data:`SHUTDOWN_SIGNAL`; the runner stops the job it runs.
SHUTDOWN = threading.Event()


@signals.worker_process_init.connect
def _on_pool_process_init(**_: Any) -> None:
    # In the pool process, before billiard's reset_signals(), which leaves SIGUSR2 alone.
    signal.signal(SHUTDOWN_SIGNAL, lambda signum, frame: SHUTDOWN.set())


# Preload (worker.preload): each pool process loads torch and the engine when it starts, not
# on its first job; its "up" message waits for that, hence the longer start-up allowance.
celery.conf.worker_proc_alive_timeout = PRELOAD_TIMEOUT_S


@signals.worker_process_init.connect
def _preload_in_pool_process(**_: Any) -> None:
    # After _on_pool_process_init (receivers run in the order connected); never in the main
    # process, which forks the pool and must not import torch.
    if get_settings().worker_preload:
        from worker.preload import preload_clients, preload_engine

        preload_clients()
        preload_engine()


def _pool_pids(pool: Any) -> list[int]:
    processes = getattr(getattr(pool, "_pool", None), "_pool", None) or []
    return [p.pid for p in processes if getattr(p, "pid", None)]


class ForwardShutdown(bootsteps.StartStopStep):
    """Forward the first shutdown signal of the main process to the pool processes."""

    # After the pool, and after WorkController.on_start installed Celery's own handlers.
    requires = {"celery.worker.components:Pool"}

    def start(self, parent: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            previous = signal.getsignal(sig)
            signal.signal(sig, partial(self._forward, parent, previous))

    @staticmethod
    def _forward(parent: Any, previous: Any, signum: int, frame: FrameType | None) -> None:
        # In a signal handler: no logging, no locks. Celery's handler (called last) installs
        # its next handler for this signal, so each signal is forwarded once.
        global _stopping
        _stopping = True
        for pid in _pool_pids(getattr(parent, "pool", None)):
            try:
                os.kill(pid, SHUTDOWN_SIGNAL)
            except OSError:
                pass  # already gone
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


celery.steps["worker"].add(ForwardShutdown)
