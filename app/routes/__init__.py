"""HTTP routes. ``api_router`` is mounted under ``/v1``; ``health_router`` at the root."""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import datasets, health, jobs

api_router = APIRouter()
api_router.include_router(datasets.router)
api_router.include_router(jobs.router)
health_router = health.router

__all__ = ["api_router", "health_router"]
