"""The one mapping of domain errors (``core.errors``) to HTTP statuses and the one JSON error
shape.

Every 4xx/5xx answer of the API has the body::

    {"error": {"code": "not_found", "message": "...", "field": "training.batch_size" | null,
               "details": [...]}}

Every answer carries the request's ``X-Request-ID`` (:mod:`app.middleware`), which the
server's log lines of that request carry too; a 500 also has it in ``error.request_id``. A
500 says nothing about its cause (no exception text, stack trace, path, SQL or address): the
cause is logged with the request id.

An outage of the database is a 503 with ``Retry-After`` (code ``database_unavailable``, or
``database_busy`` when SQLite's writer lock or the connection pool is the bottleneck), never a
500: the request can be sent again unchanged once the database is back.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.middleware import HEADER as REQUEST_ID_HEADER
from app.middleware import REQUEST_ID, request_id_of
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
    code: str = Field(description="machine-readable, e.g. not_found, validation_error")
    message: str = Field(description="for a person: what is wrong and what to change")
    field: str | None = Field(default=None, description="the request field at fault, "
                                                        "dotted (training.batch_size)")
    details: list[dict[str, Any]] = []
    request_id: str | None = Field(default=None, description="a 500's: the X-Request-ID of the "
                                                             "request (quote it when reporting)")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    """The one error shape; ``request_id`` goes into the body only when given (a 500's), every
    answer carries it in ``X-Request-ID`` (:mod:`app.middleware`)."""
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field,
                                       details=details or [], request_id=request_id))
    content = body.model_dump(mode="json")
    if request_id is None:
        del content["error"]["request_id"]
    return JSONResponse(content, status_code=status, headers=headers)


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


def http_exception_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """A Starlette/FastAPI ``HTTPException`` in the one error shape; a 405 lists every
    method of the path in ``Allow`` (:func:`allowed_methods`)."""
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def internal_error_response(request: Request) -> JSONResponse:
    """The 500 of an unhandled exception (call it while handling one): the traceback goes to
    the log with the request id; the answer names only the request id (body and
    ``X-Request-ID``). Runs in Starlette's ServerErrorMiddleware, outside the request-id
    middleware, so the id is taken back from the request's scope."""
    rid = request_id_of(request.scope)
    token = REQUEST_ID.set(rid)
    try:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        message = "internal server error"
        if rid:
            message += f"; it has been logged: quote the request id {rid} when reporting it"
        return error_response(500, "internal_error", message,
                              headers={REQUEST_ID_HEADER: rid} if rid else None, request_id=rid)
    finally:
        REQUEST_ID.reset(token)


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405 (RFC 9110 section 15.5.6): every method the app's
    OpenAPI document lists for the request's path (Starlette names only the first route's)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    return ", ".join(sorted(methods))


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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_exception_response(request, exc)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):  # an IntegrityError, a ProgrammingError: a bug
            return await _unhandled(request, exc)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                    reason[0] if reason else type(exc).__name__)
        return database_error_response(exc)

    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(PoolTimeoutError, _database)


# The errors every operation may answer, documented in the OpenAPI document with the one error
# shape (ErrorBody) instead of FastAPI's default ``{"detail": ...}``.
_ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "the request could not be parsed (a malformed body)",
    401: "no API key, or an unknown or revoked one (WWW-Authenticate: Bearer)",
    404: "no such resource (or not one of yours)",
    409: "a conflict with the resource's state or with an earlier Idempotency-Key",
    413: "the request body is too large",
    422: "an invalid request; error.field names the field at fault",
    429: "too many requests, or over a quota (Retry-After)",
    503: "the database or storage is unavailable; retry after Retry-After seconds",
}
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _error_codes(path: str, method: str, op: dict[str, Any]) -> set[int]:
    """The error statuses operation ``method path`` may answer besides its own."""
    if not path.startswith("/v1/"):
        return {422} if op.get("parameters") or op.get("requestBody") else set()
    codes = {401, 422, 429, 503}
    if "{" in path or any(p.get("name") == "after" for p in op.get("parameters", [])):
        codes.add(404)  # an unknown id, or an unknown ?after= cursor
    if "requestBody" in op:
        codes |= {400, 413}
    if method == "post":
        codes.add(409)
    return codes


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an OpenAPI document (in place; returned) so that every operation documents
    the error statuses it may answer (:func:`_error_codes`) with the ``ErrorBody`` schema, and
    FastAPI's default 422 body (``HTTPValidationError``) is gone."""
    ref = "#/components/schemas/ErrorBody"
    body_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(body_schema.pop("$defs", {}))
    components["ErrorBody"] = body_schema
    content = {"application/json": {"schema": {"$ref": ref}}}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in _HTTP_METHODS:
                continue
            responses = op.setdefault("responses", {})
            for code in sorted(_error_codes(path, method, op)):
                entry = responses.setdefault(str(code),
                                             {"description": _ERROR_DESCRIPTIONS[code]})
                if code == 422 and entry.get("description") == "Validation Error":
                    entry["description"] = _ERROR_DESCRIPTIONS[422]
                entry["content"] = content
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_openapi_errors(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI document describe its real error shape (:func:`document_errors`)."""
    generate = app.openapi
    done: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not done:
            document_errors(schema)
            done.append(True)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
