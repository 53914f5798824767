"""``/v1/jobs``: submit, list, inspect and cancel training jobs; metrics, result, checkpoints."""

from __future__ import annotations

import base64
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from app import idempotency, jobs, metricseries
from app.auth import Principal, PrincipalDep
from app.deps import EnqueuerDep, IdempotencyKeyHeader, SessionDep, SettingsDep, StorageDep
from app.estimate import JobEstimate, estimate_job
from app.http_errors import ErrorBody
from app.params import AfterQuery, AfterStepQuery, CheckpointIdPath, JobIdPath
from app.routes.files import blob_response
from app.routes.inference import InferenceClientDep
from app.schemas import (
    AttemptOut,
    CheckpointList,
    CheckpointOut,
    JobList,
    JobOut,
    JobResultOut,
    MetricDownsample,
    MetricList,
    metric_out,
)
from app.workers import WorkersDep, waiting_for_jobs
from core.routing import Route, job_route
from core.spec import JobSpec
from store import events as store_events
from store.models import Job, JobStatus
from store.queue import Enqueuer
from store.sweep import release_enqueue
from store.workers import RegistryReader

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

_JOBS = "jobs"  # the Idempotency-Key scope


_CREATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobOut | JobEstimate,
          "description": "a retry with the same Idempotency-Key and spec: the job the first "
                         "request created; with ?dry_run=true: the estimate (JobEstimate), "
                         "nothing created"},
    409: {"model": ErrorBody, "description": "the Idempotency-Key was used with another spec "
                                             "(idempotency_key_reused)"},
    422: {"model": ErrorBody, "description": "an invalid spec or Idempotency-Key, naming it"},
    503: {"model": ErrorBody, "description": "the database is unavailable (Retry-After)"},
}
DryRunQuery = Annotated[bool, Query(description="only estimate: check the spec as a "
                                                "submission would, answer 200 with its "
                                                "vocabulary, parameters, memory and time per "
                                                "step, and create nothing")]


@router.post("", status_code=201, response_model=JobOut, responses=_CREATE_RESPONSES)
def create_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    enqueuer: EnqueuerDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    inference: InferenceClientDep,
    workers: WorkersDep,
    idempotency_key: IdempotencyKeyHeader = None,
    dry_run: DryRunQuery = False,
) -> Response | JobOut:
    """Record the job (201, ``queued``), commit, then hand its id to the broker
    (``enqueued_at`` says when). A broker that does not take it (down, or refusing) leaves
    the job ``queued`` with ``enqueued_at`` null: the queued sweep enqueues it once the
    broker is back, and the answer is still 201. Publishing gives up within seconds
    (``store.queue``), never holding the request.

    With ``Idempotency-Key``: a retry with the same key and spec returns the job it created
    (200, ``Idempotent-Replayed: true``); the same key with another spec is 409
    (``idempotency_key_reused``); see :mod:`app.idempotency`.

    ``?dry_run=true``: the same checks, then 200 with the estimate (:mod:`app.estimate`:
    vocabulary bound, parameters, memory by part against the limit, seconds per step from a
    calibration on the inference server); nothing is created or remembered, and the
    Idempotency-Key is ignored."""
    if dry_run:
        est = estimate_job(session, principal, spec, settings, inference)
        return JSONResponse(est.model_dump(mode="json"))
    digest = idempotency.request_digest(spec.model_dump(mode="json"))
    ttl = settings.idempotency_ttl_s
    scope = idempotency.principal_scope(_JOBS, principal.id)
    if idempotency_key is not None:
        existing = idempotency.find(session, scope, idempotency_key, digest, ttl)
        if existing is not None:
            return _replayed(session, principal, response, existing, workers)
    try:
        # Stored as handed to the broker (enqueued_at = created_at), so that the queued sweep
        # does not enqueue it too while this request publishes; cleared if the broker refuses.
        job = jobs.create_job(session, principal, spec, enqueue=True, settings=settings)
        if idempotency_key is not None:
            idempotency.remember(session, scope, idempotency_key, digest, job.id, ttl)
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: return its job.
        winner = idempotency.winner(session, scope, idempotency_key, digest, ttl)
        return _replayed(session, principal, response, winner, workers)
    out = _out(session, job, workers)  # with its queue_position and waiting_for
    assert job.enqueued_at is not None
    if not _enqueue(session, enqueuer, job.id, job.enqueued_at, job_route(spec)):
        out = out.model_copy(update={"enqueued_at": None})
    if idempotency_key is not None:
        idempotency.purge_expired(session, ttl)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return out


def _replayed(
    session: Session, principal: Principal, response: Response, job_id: str,
    workers: RegistryReader | None = None,
) -> JobOut:
    """The answer to a retry: the job an earlier request with the same key created."""
    response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    response.headers["Idempotent-Replayed"] = "true"
    return _out(session, jobs.get_job(session, principal, job_id), workers)


def _enqueue(session: Session, enqueuer: Enqueuer, job_id: str, claimed_at: datetime,
             route: Route) -> bool:
    """Hand the committed job, stored with ``enqueued_at`` = ``claimed_at``, to the broker
    on ``route`` (its queue and broker priority, :func:`core.routing.job_route`).
    When the broker does not take it, ``enqueued_at`` goes back to NULL
    (``store.sweep.release_enqueue``) so that the queued sweep enqueues it once the broker
    is back; returns whether the broker took it. Raises nothing: should even the release
    fail, the sweep finds the job after ``LMFORGE_REQUEUE_AFTER_S`` (no message for it in
    the broker)."""
    try:
        enqueuer.enqueue(job_id, route)
        return True
    except Exception as exc:
        log.warning("the broker did not take job %s (%s: %s); it stays queued and is enqueued "
                    "when the broker is back", job_id, type(exc).__name__, exc)
    try:
        release_enqueue(session, job_id, claimed_at)
        session.commit()
    except SQLAlchemyError as exc:
        session.rollback()
        log.warning("enqueued_at of job %s was not cleared (%s); the queued sweep finds it "
                    "after LMFORGE_REQUEUE_AFTER_S", job_id, type(exc).__name__)
    return False


def _out(session: Session, job: Job, workers: RegistryReader | None = None) -> JobOut:
    return _outs(session, [job], workers)[0]


def _outs(session: Session, rows: list[Job],
          workers: RegistryReader | None = None) -> list[JobOut]:
    """Jobs as the API returns them, each with its ``attempt_history`` (one query), its
    progress's ``eta_s``/``queue_position`` (:func:`app.metricseries.progress_extras`) and,
    for a queued job that no live worker serves, ``waiting_for``
    (:func:`app.workers.waiting_for_jobs`; null without a registry)."""
    history = jobs.attempt_histories(session, [r.id for r in rows])
    extras = metricseries.progress_extras(session, rows)
    waiting = waiting_for_jobs(rows, workers)
    outs = []
    for r in rows:
        out = JobOut.model_validate(r)
        outs.append(out.model_copy(update={
            "attempt_history": [AttemptOut.model_validate(a) for a in history[r.id]],
            "progress": out.progress.model_copy(update=extras[r.id]),
            "waiting_for": waiting.get(r.id)}))
    return outs


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    workers: WorkersDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: AfterQuery = None,
    status: Annotated[JobStatus | None, Query(
        description="only jobs in this status (the cursor stays valid when its job has "
                    "changed status since)")] = None,
) -> JobList:
    rows, has_more = jobs.list_jobs(session, principal, limit, after, status=status)
    return JobList(
        data=_outs(session, rows, workers),
        has_more=has_more,
        next_after=rows[-1].id if has_more else None,
    )


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobIdPath, session: SessionDep, principal: PrincipalDep,
            workers: WorkersDep) -> JobOut:
    """The job, its progress, its ``error`` (``{code, message, retryable, phase, step}``) when
    it failed, ``attempt_history``: one entry per attempt at running it, and, while it is
    queued on a queue no live worker serves, ``waiting_for`` (e.g. "cuda")."""
    return _out(session, jobs.get_job(session, principal, job_id), workers)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: JobIdPath, session: SessionDep, principal: PrincipalDep,
               settings: SettingsDep) -> JobOut:
    """Queued: cancelled at once. Running: stops at its next step, keeping a last checkpoint.
    Finished: 409."""
    job = jobs.cancel_job(session, principal, job_id)
    session.commit()
    store_events.publisher(settings).publish(  # the job's event stream (docs/events.md)
        job.id, "status", store_events.status_data(job),
        terminal=job.status != JobStatus.RUNNING)
    return _out(session, job)


@router.get("/{job_id}/metrics", response_model=MetricList)
def list_metrics(
    job_id: JobIdPath,
    session: SessionDep,
    principal: PrincipalDep,
    after_step: AfterStepQuery = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    resolution: Annotated[int | None, Query(
        ge=metricseries.MIN_RESOLUTION, le=metricseries.MAX_RESOLUTION,
        description="at most this many rows (past after_step; limit is then ignored), "
                    "chosen to keep the curve's shape: min/max of `metric` per bucket "
                    "(app.metricseries); has_more is false")] = None,
    metric: Annotated[str | None, Query(
        pattern=metricseries.METRIC_PATTERN,
        description="with resolution: the metric whose curve is kept (default train_loss; "
                    "reward_mean for a ppo job); rows without a number for it are left "
                    "out, so val_loss gives the validation curve")] = None,
) -> MetricList:
    """The job's metric rows in step order, a page of ``limit`` after ``after_step``; or with
    ``resolution`` at most that many rows of the whole curve (see ``downsample``)."""
    if resolution is None:
        rows, has_more = jobs.list_metrics(session, principal, job_id, after_step, limit)
        return MetricList(data=[metric_out(r) for r in rows], has_more=has_more)
    job = jobs.get_job(session, principal, job_id)
    name = metric or ("reward_mean" if job.spec.get("task") == "ppo" else "train_loss")
    picked = metricseries.downsample(session, job_id, resolution, name, after_step)
    return MetricList(
        data=[metric_out(r) for r in picked.rows], has_more=False,
        downsample=MetricDownsample(metric=name, resolution=resolution,
                                    buckets=picked.buckets, total=picked.total))


@router.get("/{job_id}/metrics.csv", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}},
                             "description": "every metric row, in step order"}})
def metrics_csv(
    job_id: JobIdPath, request: Request, session: SessionDep, principal: PrincipalDep
) -> StreamingResponse:
    """Every metric row of the job as CSV, streamed in step order: a header row (``step``,
    then every metric name: the language model's in ``core.contract.StepMetrics`` order,
    then any other sorted), one line per step, an empty cell where a row has no value,
    floats written to read back exactly, a nested value as JSON."""
    jobs.get_job(session, principal, job_id)
    return StreamingResponse(
        metricseries.csv_rows(request.app.state.session_factory, job_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-metrics.csv"',
                 "Cache-Control": "no-cache"})


@router.get("/{job_id}/result", response_model=JobResultOut)
def get_result(job_id: JobIdPath, session: SessionDep, principal: PrincipalDep) -> BaseModel:
    return JobResultOut.model_validate(jobs.job_result(session, principal, job_id))


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: JobIdPath, session: SessionDep, principal: PrincipalDep
) -> CheckpointList:
    rows = jobs.list_checkpoints(session, principal, job_id)
    return CheckpointList(data=[CheckpointOut.model_validate(r) for r in rows])


_DOWNLOAD = "/{job_id}/checkpoints/{checkpoint_id}/download"
_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the checkpoint"},
    206: {"description": "the byte range(s) asked for with Range"},
    304: {"description": "If-None-Match matched the ETag: the client's copy is current"},
    400: {"model": ErrorBody, "description": "a malformed Range (invalid_range)"},
    416: {"model": ErrorBody, "description": "Range starts past the end"},
    503: {"model": ErrorBody, "description": "the blob is missing or damaged in storage"},
}


@router.get(_DOWNLOAD, response_class=FileResponse, responses=_DOWNLOAD_RESPONSES,
            operation_id="download_checkpoint")
@router.head(_DOWNLOAD, response_class=FileResponse, responses=_DOWNLOAD_RESPONSES,
             operation_id="head_checkpoint", summary="Checkpoint download headers")
def download_checkpoint(
    job_id: JobIdPath, checkpoint_id: CheckpointIdPath, request: Request, session: SessionDep,
    storage: StorageDep,
    principal: PrincipalDep,
) -> Response:
    """The checkpoint as one safetensors file. Its sha256 is in ``X-Checkpoint-SHA256`` (hex),
    the strong ``ETag`` (the hex in quotes) and ``Repr-Digest`` (RFC 9530). ``HEAD`` gives the
    headers alone; ``If-None-Match`` with the ETag gives 304; ``Range`` gives 206 (see
    :mod:`app.routes.files`). A checkpoint whose bytes fail their sha256 is never served."""
    ckpt = jobs.get_checkpoint(session, principal, job_id, checkpoint_id)
    b64 = base64.b64encode(bytes.fromhex(ckpt.sha256)).decode()
    return blob_response(
        request, storage, ckpt.storage_key,
        sha256_hex=ckpt.sha256,
        filename=f"{ckpt.job_id}-{ckpt.kind.value}-step{ckpt.step}.safetensors",
        what=f"checkpoint {ckpt.id}",
        corrupt_code="checkpoint_corrupt",
        corrupt_advice="download another checkpoint of this job",
        headers={
            "X-Checkpoint-SHA256": ckpt.sha256,
            "Repr-Digest": f"sha-256=:{b64}:",
            "Digest": f"sha-256={b64}",
        },
    )
