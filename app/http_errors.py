"""The one mapping of domain errors (``core.errors``) to HTTP statuses and the one JSON error
shape.

Every 4xx/5xx answer of the API has the body::

    {"error": {"code": "not_found", "message": "...", "field": "training.batch_size" | null,
               "details": [...]}}

An outage of the database is a 503 with ``Retry-After`` (code ``database_unavailable``, or
``database_busy`` when SQLite's writer lock or the connection pool is the bottleneck), never a
500: the request can be sent again unchanged once the database is back.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import LMForgeError

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying a request that met a database outage (the
# ``Retry-After`` of its 503): about how long a restarting PostgreSQL takes to accept again.
DATABASE_RETRY_AFTER_S = 5
# A 422 reports at most this many validation errors, each field and message cut to this many
# characters (docs/security.md, "Quotas and resource limits").
MAX_VALIDATION_ERRORS = 10
MAX_ERROR_CHARS = 200


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, Any]] = []


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field,
                                       details=details or []))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def _refine_field(path: str, msg: str, root: type[BaseModel] | None) -> str:
    """A model-level validator's error is located at the model ("model"); when its message
    starts with one of that model's field names ("tie_weights requires ..."), name that field
    ("model.tie_weights") so the caller knows what to change."""
    if root is None:
        return path
    model: Any = root
    for part in path.split(".") if path else []:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return path
        model = info.annotation
        model = next(
            (a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model
        )
    first = msg.removeprefix("Value error, ").split(" ", 1)[0]
    if first in getattr(model, "model_fields", {}):
        return f"{path}.{first}" if path else first
    return path


def validation_details(
    errors: list[Any], root: type[BaseModel] | None = None
) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        kind = e.get("type")
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        loc = list(e.get("loc", ()))
        if kind == "json_invalid":
            # loc is ("body", <character offset>): an offset is not a field.
            pos = loc[1] if len(loc) > 1 else "?"
            reason = (e.get("ctx") or {}).get("error", msg)
            out.append({"field": None, "type": kind,
                        "message": f"the request body is not valid JSON ({reason} at "
                                   f"character {pos})"})
            continue
        path = _field_path(loc)
        if not path and loc[:1] == ["body"]:
            if kind == "missing":
                msg = "a JSON request body is required"
            elif kind in ("model_attributes_type", "dict_type"):
                msg = ("the request body must be a JSON object (send it with "
                       "Content-Type: application/json)")
        if kind == "value_error":
            path = _refine_field(path, msg, root)
        out.append({"field": path or None, "message": msg, "type": kind})
    return out


def bounded_validation_details(
    errors: Any, root: type[BaseModel] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """The :func:`validation_details` of the first :data:`MAX_VALIDATION_ERRORS` of ``errors``,
    each field and message cut to :data:`MAX_ERROR_CHARS`, and what to append to the message
    about the errors left out ("" when none), so that a body of a million unknown keys gets
    a small answer."""
    details = validation_details(list(errors[:MAX_VALIDATION_ERRORS]), root)
    for d in details:
        for k in ("field", "message"):
            if isinstance(d[k], str) and len(d[k]) > MAX_ERROR_CHARS:
                d[k] = d[k][:MAX_ERROR_CHARS] + "..."
    more = len(errors) - len(details)
    return details, f"; and {more} more errors not shown" if more > 0 else ""


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be used right now (a lost or refused
    connection, a server shutting down, a lock or pool timeout) rather than a bug in the
    request or the code: SQLAlchemy's ``OperationalError`` and ``InterfaceError``, any
    ``DBAPIError`` that invalidated its connection, and the pool's ``TimeoutError``."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def database_error_response(exc: BaseException) -> JSONResponse:
    """The 503 for an unusable database (:func:`database_unavailable`), with ``Retry-After``.
    ``database_busy`` when SQLite's writer lock or the pool timed out (the database is up
    but saturated), else ``database_unavailable``."""
    busy = isinstance(exc, PoolTimeoutError) or "database is locked" in str(exc)
    if busy:
        code, message = "database_busy", "the database is busy; retry in a few seconds"
    else:
        code, message = ("database_unavailable",
                         "the database is unavailable; retry in a few seconds")
    return error_response(503, code, message,
                          headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})


def install_error_handlers(app: FastAPI, body_model: type[BaseModel] | None = None) -> None:
    """Map domain errors, request validation, HTTP errors and anything unhandled to the one
    error shape. ``body_model`` (the job spec) lets model-level errors name their field."""

    @app.exception_handler(LMForgeError)
    async def _domain(_: Request, exc: LMForgeError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.field, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details, not_shown = bounded_validation_details(exc.errors(), body_model)
        fields = [d["field"] for d in details if d["field"]]
        message = "; ".join(
            f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details
        ) + not_shown
        return error_response(
            422, "validation_error", message or "invalid request",
            fields[0] if fields else None, details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):  # an IntegrityError, a ProgrammingError: a bug
            return await _unhandled(request, exc)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                    reason[0] if reason else type(exc).__name__)
        return database_error_response(exc)

    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(PoolTimeoutError, _database)
