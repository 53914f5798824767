"""``/v1/jobs``: submit, list, inspect and cancel training jobs; metrics, result, checkpoints."""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app import jobs
from app.deps import EnqueuerDep, SessionDep, StorageDep
from app.schemas import (
    CheckpointList,
    CheckpointOut,
    JobList,
    JobOut,
    JobResultOut,
    MetricList,
    metric_out,
)
from core.errors import ServiceUnavailable
from core.spec import JobSpec
from store.status import mark_enqueue_failed

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut)
def create_job(
    spec: JobSpec, response: Response, session: SessionDep, enqueuer: EnqueuerDep
) -> JobOut:
    """Record the job, commit, then enqueue its id. If the broker cannot take it, the job is
    marked failed (``enqueue_failed``) and the answer is 503 naming the job."""
    job = jobs.create_job(session, spec)
    session.commit()
    try:
        enqueuer.enqueue(job.id)
    except Exception as exc:
        log.exception("enqueue of %s failed", job.id)
        mark_enqueue_failed(session, job.id, f"{type(exc).__name__}: {exc}")
        session.commit()
        raise ServiceUnavailable(
            f"job {job.id} was recorded but could not be queued: the broker is unreachable; "
            f"it is marked failed (enqueue_failed); submit it again later",
            code="enqueue_failed",
            details=[{"job_id": job.id}],
        ) from exc
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[str | None, Query(description="id of the last job of the previous page")]
    = None,
) -> JobList:
    rows, has_more = jobs.list_jobs(session, limit, after)
    return JobList(
        data=[JobOut.model_validate(r) for r in rows],
        has_more=has_more,
        next_after=rows[-1].id if has_more else None,
    )


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep) -> JobOut:
    return JobOut.model_validate(jobs.get_job(session, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    """Queued: cancelled at once. Running: stops at its next step, keeping a last checkpoint.
    Finished: 409."""
    job = jobs.cancel_job(session, job_id)
    session.commit()
    return JobOut.model_validate(job)


@router.get("/{job_id}/metrics", response_model=MetricList)
def list_metrics(
    job_id: str,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricList:
    rows, has_more = jobs.list_metrics(session, job_id, after_step, limit)
    return MetricList(data=[metric_out(r) for r in rows], has_more=has_more)


@router.get("/{job_id}/result", response_model=JobResultOut)
def get_result(job_id: str, session: SessionDep) -> BaseModel:
    return JobResultOut.model_validate(jobs.job_result(session, job_id))


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep) -> CheckpointList:
    rows = jobs.list_checkpoints(session, job_id)
    return CheckpointList(data=[CheckpointOut.model_validate(r) for r in rows])


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(
    job_id: str, checkpoint_id: str, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    """The checkpoint as one safetensors file, streamed; its sha256 is in
    ``X-Checkpoint-SHA256`` (hex), ``ETag`` and ``Repr-Digest`` (RFC 9530)."""
    ckpt = jobs.get_checkpoint(session, job_id, checkpoint_id)
    if not storage.exists(ckpt.storage_key):
        raise ServiceUnavailable(f"the blob of checkpoint {ckpt.id} is missing from storage",
                                 code="blob_missing")
    # A checkpoint that fails its sha256 is never offered (one extra read of a few MB; the
    # headers below must be right before the first byte is sent).
    digest = hashlib.sha256()
    for chunk in storage.iter_bytes(ckpt.storage_key):
        digest.update(chunk)
    if digest.hexdigest() != ckpt.sha256:
        log.error("checkpoint %s of job %s fails its sha256", ckpt.id, job_id)
        raise ServiceUnavailable(
            f"checkpoint {ckpt.id} is damaged in storage (its sha256 does not match); "
            f"download another checkpoint of this job", code="checkpoint_corrupt")
    b64 = base64.b64encode(bytes.fromhex(ckpt.sha256)).decode()
    filename = f"{job_id}-{ckpt.kind.value}-step{ckpt.step}.safetensors"
    headers = {
        "Content-Length": str(ckpt.bytes),
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Checkpoint-SHA256": ckpt.sha256,
        "ETag": f'"{ckpt.sha256}"',
        "Repr-Digest": f"sha-256=:{b64}:",
        "Digest": f"sha-256={b64}",
    }
    return StreamingResponse(
        storage.iter_bytes(ckpt.storage_key), media_type="application/octet-stream",
        headers=headers,
    )
