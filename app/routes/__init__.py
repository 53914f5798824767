"""HTTP routes. ``api_router`` is mounted under ``/v1``; ``health_router`` at the root.

Every ``/v1`` route depends on ``app.auth.current_principal`` (an API key is required: 401
otherwise); ``/healthz`` and the API docs do not.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from app.auth import current_principal
from app.http_errors import ErrorBody
from app.routes import datasets, events, export, health, inference, jobs, keys, ops, samples

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no API key, or an invalid or revoked one "
                                             "(WWW-Authenticate: Bearer)"},
}

api_router = APIRouter(dependencies=[Depends(current_principal)], responses=_AUTH_RESPONSES)
api_router.include_router(datasets.router)
api_router.include_router(jobs.router)
api_router.include_router(events.router)  # GET /v1/jobs/{id}/events
api_router.include_router(samples.router)
api_router.include_router(ops.router)  # webhooks log, TensorBoard files
api_router.include_router(inference.router)
api_router.include_router(export.router)
api_router.include_router(keys.router)
health_router = health.router
health_router.include_router(events.health_router)  # GET /healthz/events

__all__ = ["api_router", "health_router"]
