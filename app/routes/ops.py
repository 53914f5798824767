"""Operations routes of a job: its webhook delivery log and its TensorBoard event files
(docs/operations.md, "Webhooks" and "Integrations")."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict

from app import jobs
from app.auth import PrincipalDep
from app.deps import SessionDep, StorageDep
from app.http_errors import ErrorBody
from app.params import JobIdPath
from app.webhooks import deliveries_of
from core.errors import NotFound, ServiceUnavailable
from store.integrations import tensorboard_key
from store.storage import BlobCorrupt

router = APIRouter(prefix="/jobs", tags=["operations"])


class WebhookDeliveryOut(BaseModel):
    """One webhook of a job and where its delivery stands: ``waiting`` (the job has not
    finished), ``pending`` (a try is due at ``next_attempt_at``), ``delivered``, ``failed``
    (no more tries)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    state: str
    event: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None  # the receiver's last answer
    last_error: str | None  # why the last try failed
    created_at: datetime
    delivered_at: datetime | None


class WebhookDeliveryList(BaseModel):
    data: list[WebhookDeliveryOut]


@router.get("/{job_id}/webhooks", response_model=WebhookDeliveryList)
def list_webhooks(job_id: JobIdPath, session: SessionDep,
                  principal: PrincipalDep) -> WebhookDeliveryList:
    """The job's webhook (``notify``) and its delivery: state, tries, the last answer."""
    jobs.get_job(session, principal, job_id)
    return WebhookDeliveryList(data=[WebhookDeliveryOut.model_validate(d)
                                     for d in deliveries_of(session, job_id)])


_TB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/gzip": {}},
          "description": "a gzip-compressed tar of the job's TensorBoard event files "
                         "(`tensorboard --logdir` on the extracted folder)"},
    404: {"model": ErrorBody, "description": "no such job, or it has written no TensorBoard "
                                             "files (no tensorboard integration, or not yet)"},
    503: {"model": ErrorBody, "description": "the archive is damaged in the object store "
                                             "(`blob_corrupt`), or the store cannot be reached "
                                             "(`storage_unavailable`)"},
}


@router.get("/{job_id}/tensorboard.tar.gz", response_class=Response, responses=_TB_RESPONSES)
def download_tensorboard(job_id: JobIdPath, session: SessionDep, principal: PrincipalDep,
                         storage: StorageDep) -> Response:
    """The job's TensorBoard event files as one ``.tar.gz`` (folder ``<job_id>/``), as the
    worker last uploaded them: at each checkpoint and at the end of the run."""
    jobs.get_job(session, principal, job_id)
    key = tensorboard_key(job_id)
    if not storage.exists(key):
        raise NotFound(f"job {job_id} has no TensorBoard files (its spec has no tensorboard "
                       "integration, or it has not written any yet)")
    try:
        data = storage.read_bytes(key)
    except BlobCorrupt as exc:  # an object store's blob whose bytes changed
        raise ServiceUnavailable(
            f"job {job_id}'s TensorBoard files are damaged in storage ({exc}); the worker "
            "writes them again at the job's next checkpoint", code="blob_corrupt") from exc
    return Response(data, media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="{job_id}-tensorboard.tar.gz"',
        "Cache-Control": "no-cache"})
