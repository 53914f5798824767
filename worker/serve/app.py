"""The inference server's FastAPI app (``lmforge serve``; :func:`create_app`).

A separate process from the API, so that the API never imports torch. Routes (all POST JSON,
each payload with ``{"checkpoint": {"storage_key", "sha256", "id"}}`` and ``deadline_s``):
``/generate``, ``/score``, ``/classify``; helpers' routers (``/export``, ``/calibrate``) are
included here too. ``GET /healthz`` answers ``{"status": "ok"}``.

Errors use the API's shape ``{"error": {"code", "message", "field"?}}`` so that the API passes
a 4xx through unchanged (:mod:`app.inference`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from store.settings import Settings, get_settings


def error_json(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    """The one error shape (as :func:`app.http_errors.error_response`, which this layer may not
    import)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return JSONResponse({"error": err}, status_code=status)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The inference server's app; ``settings`` default to :func:`get_settings`."""
    settings = settings or get_settings()
    app = FastAPI(title="LMForge inference", docs_url=None, redoc_url=None)
    app.state.settings = settings

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_json(422, "validation_error", f"{field}: {msg}" if field else msg, field)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
