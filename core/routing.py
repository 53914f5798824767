"""Which Celery queue a job goes to, and with which broker priority (docs/deploy.md).

Torch-free: the API routes at submission, the sweeps route again when they requeue a job, and
workers say which queues they serve with the same names.

Queues: ``lmforge`` (device "auto": any worker), ``cpu``, ``cuda``; a job of ``gpus: N > 1``
data-parallel processes goes to ``<class>-x<N>`` (``cuda-x2``, ``cpu-x2``, ``lmforge-x2``),
served by workers started with ``--gpus-per-job N``; ``resources.queue`` names a queue
outright. Priority: the spec's ``priority`` runs from 0 (lowest) to 9 (highest); kombu's Redis
transport pops its priority steps lowest number first, so the broker priority is
``9 - priority`` (Celery's "Routing Tasks" guide, "Redis Message Priorities").
"""

from __future__ import annotations

from dataclasses import dataclass

from core.spec import JobSpec

#: The queue of device "auto" jobs (and the one every worker serves by default).
DEFAULT_QUEUE = "lmforge"
#: The device class each queue of the default naming serves.
DEVICE_QUEUES: dict[str, str] = {"auto": DEFAULT_QUEUE, "cpu": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class Route:
    """Where a job's message goes: ``queue``, ``broker_priority`` (0 = first, 9 = last), the
    ``device_class`` it needs ("auto", "cpu" or "cuda") and its ``world_size`` (processes)."""

    queue: str
    broker_priority: int
    device_class: str
    world_size: int


def queue_name(device_class: str, world_size: int = 1) -> str:
    """The default queue of a device class ("auto", "cpu", "cuda") and process count."""
    base = DEVICE_QUEUES[device_class]
    return base if world_size == 1 else f"{base}-x{world_size}"


def job_route(spec: JobSpec) -> Route:
    """The route of ``spec`` (its ``resources`` and ``priority``)."""
    r = spec.resources
    device_class = r.device or "auto"
    queue = r.queue or queue_name(device_class, r.gpus)
    return Route(queue=queue, broker_priority=9 - spec.priority, device_class=device_class,
                 world_size=r.gpus)
