"""The worker registry as the API reads it (``store.workers``): the FastAPI dependency that
hands routes one cached :class:`store.workers.RegistryReader` per app, and what a queued job
is ``waiting_for`` (docs/deploy.md, "Queues and devices")."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from store.models import Job, JobStatus
from store.queue import stored_route
from store.workers import RegistryReader, waiting_for


def get_worker_registry(request: Request) -> RegistryReader | None:
    """This app's registry reader (made on first use from ``REDIS_URL``), or None when the
    broker is not Redis."""
    state = request.app.state
    if not hasattr(state, "worker_registry"):
        url = state.settings.redis_url
        state.worker_registry = (RegistryReader(url)
                                 if url.split("://", 1)[0] in ("redis", "rediss", "unix")
                                 else None)
    reader: RegistryReader | None = state.worker_registry
    return reader


WorkersDep = Annotated[RegistryReader | None, Depends(get_worker_registry)]


def waiting_for_jobs(rows: list[Job], registry: RegistryReader | None) -> dict[str, str]:
    """For each queued job of ``rows`` whose queue (``store.queue.stored_route``) no live
    worker serves: what it waits for (``store.workers.waiting_label``: "cuda", "cpu",
    "worker", "cuda x2", "queue <name>"). Jobs not listed: not queued, served, or the
    registry could not be read (Redis down: logged by the reader). Reads the registry only
    when a queued job is among ``rows`` (at most once per ``store.workers.CACHE_S``)."""
    queued = [r for r in rows if r.status == JobStatus.QUEUED]
    if not queued or registry is None:
        return {}
    served = registry.served_queues()
    out = {}
    for r in queued:
        label = waiting_for(stored_route(r.spec).queue, served)
        if label is not None:
            out[r.id] = label
    return out
