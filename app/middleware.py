"""Pure ASGI middleware of the API: request ids and CORS.

**Request ids.** Every response carries ``X-Request-ID``: the client's own when it sent a sane
one (1-128 characters of ``A-Z a-z 0-9 . _ : -``), else a new random one (32 hex digits). While
the request is handled, :data:`REQUEST_ID` holds it, and every log record made meanwhile (in
the event loop or in the thread pool, which copies the context) has it as
``record.request_id`` and its message is prefixed with ``[request <id>]``, so a client's
report of a failure ("request id ...") leads to the server's log lines of that request. Error
bodies carry it too (``error.request_id``, :mod:`app.http_errors`).

**CORS** is off unless ``LMFORGE_CORS_ORIGINS`` names origins (comma-separated, or ``*``):
then Starlette's ``CORSMiddleware`` answers preflights and adds the ``Access-Control-*``
headers for those origins only. Credentials (cookies) are never allowed: the API
authenticates with ``Authorization: Bearer`` keys, which a browser does not attach to a
cross-site request on its own, so a cross-site form POST reaches the API without a key and is
refused (401).
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store.logs import JOB_ID, JOB_ID_IN_PATH

HEADER = "X-Request-ID"
# The scope key under which the request id travels (the 500 handler runs outside this
# middleware, in Starlette's ServerErrorMiddleware, and reads it from there).
SCOPE_KEY = "lmforge.request_id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

REQUEST_ID: ContextVar[str | None] = ContextVar("lmforge_request_id", default=None)


def new_request_id() -> str:
    """A fresh request id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def accepted_request_id(value: str | None) -> str:
    """``value`` when it is a sane client-supplied id, else a new one."""
    if value is not None and _SANE.fullmatch(value):
        return value
    return new_request_id()


def request_id_of(scope: Scope) -> str | None:
    """The request id the middleware gave ``scope``'s request (None outside it)."""
    rid = scope.get(SCOPE_KEY)
    return rid if isinstance(rid, str) else None


class RequestIdMiddleware:
    """Give each HTTP request an id (see the module docstring) and send it back as
    ``X-Request-ID`` on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                sent = value.decode("latin-1")
                break
        rid = accepted_request_id(sent)
        scope[SCOPE_KEY] = rid
        raw = rid.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", raw)]}
            await send(message)

        token = REQUEST_ID.set(rid)
        # A request about one job: its log records carry the job id too (store.logs).
        named = JOB_ID_IN_PATH.search(scope.get("path", ""))
        job_token = JOB_ID.set(named.group(1) if named else None)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            JOB_ID.reset(job_token)
            REQUEST_ID.reset(token)


class SettingsCORSMiddleware:
    """Starlette's ``CORSMiddleware`` for the origins of ``app.state.settings.cors_origins``,
    built at the first request (the settings are read at startup); a pass-through when there
    are none (the default)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: ASGIApp | None = None
        self._origins: tuple[str, ...] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._origins is None:
            settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
            self._origins = tuple(getattr(settings, "cors_origin_list", ()) or ())
            if self._origins:
                self._cors = CORSMiddleware(
                    self.app,
                    allow_origins=list(self._origins),
                    allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"],
                    allow_headers=["Authorization", "Content-Type", "Idempotency-Key",
                                   HEADER, "If-None-Match", "Range", "If-Range"],
                    expose_headers=[HEADER, "Location", "Retry-After", "ETag",
                                    "Idempotent-Replayed", "X-Checkpoint-SHA256",
                                    "Repr-Digest", "Content-Disposition"],
                    allow_credentials=False,
                    max_age=600,
                )
        await (self._cors or self.app)(scope, receive, send)


_installed = False


def install_log_request_ids() -> None:
    """Make every log record carry the current request id (``record.request_id``, ``"-"``
    outside a request) and prefix its message with ``[request <id>]`` during a request.
    Idempotent; wraps the process's log record factory once."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        rid = REQUEST_ID.get()
        record.request_id = rid or "-"
        if rid is not None and isinstance(record.msg, str):
            # rid is [A-Za-z0-9._:-]: no "%" that could disturb %-formatting.
            record.msg = f"[request {rid}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
