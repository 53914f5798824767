"""The inference server's FastAPI app (``lmforge serve``; :func:`create_app`).

A separate process from the API, so that the API never imports torch. Routes (all POST JSON,
each payload with ``{"checkpoint": {"storage_key", "sha256", "id"}}`` and ``deadline_s``):
``/generate``, ``/score``, ``/classify`` (:mod:`worker.serve.routes`); helpers' routers
(``/export``, ``/calibrate``) are included here too. ``GET /healthz`` answers
``{"status": "ok", ...}``.

Errors use the API's shape ``{"error": {"code", "message", "field"?}}`` so that the API passes
them through unchanged (:mod:`app.inference`): 422 ``validation_error``, 409 ``wrong_task``,
501 ``not_implemented``, 503 ``blob_missing``/``checkpoint_corrupt``, 504
``deadline_exceeded``, 500 ``invalid_checkpoint``/``internal_error``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from core.contract import TrainingError
from core.errors import LMForgeError
from store.settings import Settings, get_settings
from store.storage import Storage, make_storage
from worker.engine.generate import DeadlineExceeded
from worker.serve import export_routes
from worker.serve.models import ModelCache, resolve_device
from worker.serve.routes import ServeState
from worker.serve.routes import router as inference_router

log = logging.getLogger(__name__)


def error_json(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    """The one error shape (as :func:`app.http_errors.error_response`, which this layer may not
    import)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return JSONResponse({"error": err}, status_code=status)


def create_app(settings: Settings | None = None, storage: Storage | None = None) -> FastAPI:
    """The inference server's app; ``settings`` default to :func:`get_settings`, ``storage`` to
    ``make_storage(settings)`` (the API's)."""
    settings = settings or get_settings()
    app = FastAPI(title="LMForge inference", docs_url=None, redoc_url=None)
    app.state.settings = settings
    device = resolve_device(settings.inference_device)
    cache = ModelCache(storage or make_storage(settings),
                       settings.inference_cache_models, device)
    app.state.inference = ServeState(cache=cache, compute=threading.Lock())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_json(422, "validation_error", f"{field}: {msg}" if field else msg, field)

    @app.exception_handler(LMForgeError)
    async def _domain(_: Request, exc: LMForgeError) -> JSONResponse:
        return error_json(exc.status_code, exc.code, exc.message, exc.field)

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(_: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_json(504, "deadline_exceeded", str(exc) or "the deadline passed")

    @app.exception_handler(TrainingError)
    async def _checkpoint(_: Request, exc: TrainingError) -> JSONResponse:
        return error_json(500, exc.code, exc.message)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_json(500, "internal_error", "internal error of the inference server; it "
                                                 "has been logged")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "device": str(device), "cached_models": len(cache.keys())}

    app.include_router(inference_router)
    app.include_router(export_routes.router)  # /export, /calibrate
    return app
