"""The worker registry: which queues the live workers serve, kept in Redis (docs/deploy.md,
"Queues and devices").

Each worker's main process (``worker.celery_app.WorkerRegistry``) writes one JSON object under
``lmforge:worker:<hostname>`` (:func:`publish`) with a time to live of :data:`TTL_S` seconds
and writes it again every :data:`REFRESH_S` seconds on the worker's timer; a clean shutdown
deletes it (:func:`remove`), a killed worker's entry expires. :func:`live_workers` lists the
entries; the API reads them through :class:`RegistryReader` (cached for a second or two) to
tell, for a queued job, what no live worker offers (:func:`waiting_for`).

The entry, :class:`WorkerInfo`: ``hostname`` (the Celery node name), ``queues`` (the Celery
queues it consumes, in its order), ``device_class`` ("cpu" or "cuda"), ``gpus`` (its
``CUDA_VISIBLE_DEVICES``, or null when unset), ``gpus_per_job`` (the processes of one
data-parallel job it runs, ``lmforge worker --gpus-per-job``), ``pid`` (its main process) and
``started_at`` (ISO 8601, UTC).

Torch-free and Celery-free: the API imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The key of a worker's entry is this prefix, its Celery node name and the process id of its
#: main process: two workers started on one host with the same node name (Celery's default,
#: ``celery@<host>``) keep an entry each.
KEY_PREFIX = "lmforge:worker:"
#: How often a worker writes its entry again (seconds).
REFRESH_S = 5.0
#: How long an entry lives without a refresh (seconds): a worker killed without a clean
#: shutdown drops out of :func:`live_workers` at most this long after its last refresh.
TTL_S = 30
#: How long :class:`RegistryReader` reuses a read of the registry (seconds).
CACHE_S = 1.5
#: Set by ``lmforge worker`` for the worker process: its device class ("cpu" or "cuda") and
#: the processes of one job (``--gpus-per-job``), which the registry entry reports.
ENV_DEVICE = "LMFORGE_WORKER_DEVICE"
ENV_GPUS_PER_JOB = "LMFORGE_WORKER_GPUS_PER_JOB"
#: One directory per NVIDIA GPU that the driver sees (the NVIDIA kernel module's procfs).
NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")

_DEFAULT_QUEUE = re.compile(r"(lmforge|cpu|cuda)(?:-x([1-9][0-9]*))?")
_WAITING_BASE = {"lmforge": "worker", "cpu": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker's entry (see the module's docstring for each field)."""

    hostname: str
    queues: tuple[str, ...]
    device_class: str
    gpus: str | None
    gpus_per_job: int
    pid: int
    started_at: str

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "queues": list(self.queues)})

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        """Parse an entry. Raises ``ValueError``/``KeyError``/``TypeError`` on a bad one."""
        d = json.loads(raw)
        return cls(hostname=str(d["hostname"]), queues=tuple(str(q) for q in d["queues"]),
                   device_class=str(d["device_class"]),
                   gpus=None if d.get("gpus") is None else str(d["gpus"]),
                   gpus_per_job=int(d["gpus_per_job"]), pid=int(d["pid"]),
                   started_at=str(d["started_at"]))


def nvidia_gpu_count(gpus_dir: Path = NVIDIA_GPUS_DIR) -> int:
    """How many NVIDIA GPUs the driver reports (entries of ``/proc/driver/nvidia/gpus``; 0
    without the driver). Never imports torch or initialises CUDA, so it is safe in a process
    that forks. Raises nothing."""
    try:
        return sum(1 for _ in gpus_dir.iterdir())
    except OSError:
        return 0


def detect_device_class(environ: dict[str, str] | None = None) -> str:
    """ "cuda" when the machine has an NVIDIA GPU (:func:`nvidia_gpu_count`) and
    ``CUDA_VISIBLE_DEVICES`` does not hide them all (set to empty or "-1"), else "cpu"."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    return "cuda" if nvidia_gpu_count() > 0 else "cpu"


def key_of(hostname: str, pid: int) -> str:
    return f"{KEY_PREFIX}{hostname}:{pid}"


def publish(client: Any, info: WorkerInfo, ttl_s: int = TTL_S) -> None:
    """Write ``info`` under its key with a time to live of ``ttl_s`` seconds. ``client``: a
    ``redis.Redis``. Raises ``redis.exceptions.RedisError`` when Redis does not answer."""
    client.set(key_of(info.hostname, info.pid), info.to_json(), ex=ttl_s)


def remove(client: Any, info: WorkerInfo) -> None:
    """Delete the entry of worker ``info``. Raises ``redis.exceptions.RedisError``."""
    client.delete(key_of(info.hostname, info.pid))


def live_workers(client: Any) -> list[WorkerInfo]:
    """Every worker whose entry has not expired, by hostname (a ``SCAN`` over
    ``lmforge:worker:*`` and one ``MGET``). An unreadable entry is skipped (logged). Raises
    ``redis.exceptions.RedisError`` when Redis does not answer."""
    keys = sorted(client.scan_iter(match=f"{KEY_PREFIX}*", count=500))
    if not keys:
        return []
    out = []
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if raw is None:
            continue  # expired between the scan and the read
        try:
            out.append(WorkerInfo.from_json(raw))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("worker registry: unreadable entry %r (%s)", key, exc)
    return sorted(out, key=lambda w: w.hostname)


def served_queues(workers: Iterable[WorkerInfo]) -> set[str]:
    """Every queue some worker of ``workers`` consumes."""
    return {q for w in workers for q in w.queues}


def waiting_label(queue: str) -> str:
    """What a job on ``queue`` waits for when no live worker serves that queue:

    - ``"cpu"`` / ``"cuda"`` for the device queues ``cpu`` / ``cuda``;
    - ``"worker"`` for ``lmforge`` (device "auto": no worker at all serves the default queue);
    - ``"<cpu|cuda|worker> x<N>"`` for ``<cpu|cuda|lmforge>-x<N>`` (a worker started with
      ``--gpus-per-job N``), e.g. ``"cuda x2"``;
    - ``"queue <name>"`` for any other queue (``resources.queue``), e.g. ``"queue a100"``.
    """
    m = _DEFAULT_QUEUE.fullmatch(queue)
    if m is None:
        return f"queue {queue}"
    base = _WAITING_BASE[m[1]]
    return base if m[2] is None else f"{base} x{m[2]}"


def waiting_for(queue: str, served: Collection[str] | None) -> str | None:
    """:func:`waiting_label` of ``queue`` when no queue of ``served`` is it; None when some
    live worker serves it, or when ``served`` is None (the registry could not be read)."""
    if served is None or queue in served:
        return None
    return waiting_label(queue)


class RegistryReader:
    """The registry as the API reads it: :meth:`workers` reuses one read for ``cache_s``
    seconds, so listing jobs costs at most one Redis round trip that often. Thread-safe.

    ``redis_url``: the broker's URL (``REDIS_URL``; the workers write to the same database).
    Every command is bounded by ``socket_timeout`` seconds; a Redis that does not answer
    gives None (a warning at the first failed read of an outage) and is asked again after
    ``cache_s``."""

    def __init__(self, redis_url: str, *, cache_s: float = CACHE_S,
                 socket_timeout: float = 0.5) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout,
                                           socket_connect_timeout=socket_timeout)
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._workers: list[WorkerInfo] | None = None
        self._failing = False

    def workers(self) -> list[WorkerInfo] | None:
        """The live workers (:func:`live_workers`), or None when Redis did not answer."""
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.cache_s:
                try:
                    self._workers = live_workers(self.client)
                    if self._failing:
                        log.info("worker registry readable again")
                    self._failing = False
                except Exception as exc:  # redis.RedisError, OSError: the broker is down
                    # Once per outage at warning level, then at debug (every CACHE_S).
                    (log.debug if self._failing else log.warning)(
                        "worker registry not readable (%s: %s); waiting_for is null",
                        type(exc).__name__, exc)
                    self._failing = True
                    self._workers = None
                self._read_at = time.monotonic()
            return self._workers

    def served_queues(self) -> set[str] | None:
        """The queues the live workers serve, or None when unknown."""
        workers = self.workers()
        return None if workers is None else served_queues(workers)

    def close(self) -> None:
        self.client.close()
