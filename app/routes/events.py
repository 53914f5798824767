"""``GET /v1/jobs/{id}/events``: a job's live, resumable event stream (Server-Sent Events;
docs/events.md, :mod:`app.events`), and ``GET /healthz/events``: this process's open streams."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from app import jobs, quotas
from app.auth import PrincipalDep
from app.deps import SettingsDep
from app.events import (
    LAST_EVENT_ID_PATTERN,
    EventStreamResponse,
    JobEventStream,
    open_streams,
    parse_position,
)
from app.http_errors import ErrorBody
from app.params import AfterStepQuery, JobIdPath

router = APIRouter(prefix="/jobs", tags=["jobs"])
health_router = APIRouter()

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}},
          "description": "Server-Sent Events: status, metrics (id: the step), checkpoint, "
                         "warning, a comment heartbeat; the stream ends after the terminal "
                         "status (docs/events.md)"},
    404: {"model": ErrorBody, "description": "no such job (or another principal's)"},
    422: {"model": ErrorBody, "description": "a malformed Last-Event-ID or after_step"},
    429: {"model": ErrorBody, "description": "all of this principal's LMFORGE_QUOTA_STREAMS "
                                             "streams are open (quota_exceeded)"},
}
LastEventIdHeader = Annotated[
    str,
    Header(alias="Last-Event-ID", pattern=LAST_EVENT_ID_PATTERN,
           description="the last event id received (a reconnecting EventSource sends it): "
                       "a step, or <step>:<checkpoint id>; only what comes after it is "
                       "sent; wins over after_step"),
]


@router.get("/{job_id}/events", response_class=Response, responses=_RESPONSES)
def job_events(
    job_id: JobIdPath,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    after_step: AfterStepQuery | None = None,
    last_event_id: LastEventIdHeader = "",
) -> Response:
    """The job's events as Server-Sent Events: its current ``status``, the ``metrics`` rows
    after ``Last-Event-ID`` / ``after_step`` (each with ``id:`` its step) and the
    ``checkpoint`` rows, then live events as the worker commits them; ``warning`` events
    (``fresh_state_gap``) and the terminal ``status`` end the stream. A ``: heartbeat``
    comment comes after ``LMFORGE_EVENTS_HEARTBEAT_S`` (15) seconds without an event.

    Each principal holds at most ``LMFORGE_QUOTA_STREAMS`` streams at once (429
    ``quota_exceeded``; admins exempt); a disconnect frees the slot at once."""
    position = parse_position(last_event_id, after_step)
    factory = request.app.state.session_factory
    with factory() as session:
        jobs.get_job(session, principal, job_id)  # 404 for another principal's job
    slot = ExitStack()
    slot.enter_context(quotas.stream_slot(principal, settings))  # 429
    stream = JobEventStream(job_id, factory, settings, position)
    return EventStreamResponse(stream.chunks(), on_close=slot.close)


@health_router.get("/healthz/events", include_in_schema=False)
def event_streams() -> dict[str, int]:
    """``{"open_streams", "redis_connections"}`` of this API process (no key needed, as
    ``/healthz``: counts only)."""
    return open_streams()
