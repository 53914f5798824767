"""``/v1/datasets``: upload and read text datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app import datasets, idempotency, quotas
from app.auth import PrincipalDep
from app.deps import IdempotencyKeyHeader, SessionDep, SettingsDep, StorageDep
from app.http_errors import ErrorBody
from app.params import AfterQuery, DatasetIdPath
from app.routes.uploads import receive_text_file
from app.schemas import DatasetList, DatasetOut
from core.spec import NO_CONTROL_PATTERN

router = APIRouter(prefix="/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        # The bytes must be UTF-8 text (422 naming the byte offset otherwise).
                        "file": {"type": "string", "contentMediaType": "text/plain",
                                 "minLength": 1, "description": "UTF-8 text"},
                        "name": {"type": "string", "maxLength": 200,
                                 "pattern": NO_CONTROL_PATTERN},
                    },
                },
                "encoding": {"file": {"contentType": "text/plain; charset=utf-8"}},
            }
        },
    }
}


_DATASETS = "datasets"  # the Idempotency-Key scope


@router.post(
    "", status_code=201, response_model=DatasetOut, openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": DatasetOut, "description": "a retry with the same Idempotency-Key and "
                                                  "file: the dataset the first request made"},
        409: {"model": ErrorBody, "description": "the Idempotency-Key was used with another "
                                                 "upload (idempotency_key_reused)"},
        413: {"model": ErrorBody, "description": "larger than LMFORGE_MAX_UPLOAD_BYTES"},
        503: {"model": ErrorBody, "description": "the database is unavailable (Retry-After)"},
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DatasetOut:
    """Stream a UTF-8 text file to storage (413 past ``LMFORGE_MAX_UPLOAD_BYTES``).

    With ``Idempotency-Key``: a retry with the same key, name, file name and content returns
    the dataset the first request made (200, ``Idempotent-Replayed: true``; the new copy is
    discarded); the same key with another upload is 409 (``idempotency_key_reused``)."""
    # Over the dataset-bytes quota already: refused before a byte is read (409).
    await run_in_threadpool(quotas.check_dataset_quota, session, principal, settings, 1)
    dataset_id = datasets.new_dataset_id()
    key = datasets.storage_key(dataset_id)
    upload = await receive_text_file(request, storage, key, settings.max_upload_bytes)
    name = (upload.name or upload.filename or dataset_id)[:200]
    digest = idempotency.request_digest(
        {"name": upload.name, "filename": upload.filename, "sha256": upload.sha256,
         "bytes": upload.bytes})
    ttl = settings.idempotency_ttl_s
    scope = idempotency.principal_scope(_DATASETS, principal.id)

    def save() -> tuple[DatasetOut, bool]:
        """The dataset and whether it is new; the stored copy is deleted unless it is."""
        created = False
        try:
            if idempotency_key is not None:
                existing = idempotency.find(session, scope, idempotency_key, digest, ttl)
                if existing is not None:
                    return DatasetOut.model_validate(
                        datasets.get_dataset(session, principal, existing)), False
            try:
                quotas.check_dataset_quota(session, principal, settings, upload.bytes)
                row = datasets.add_dataset(
                    session, principal, dataset_id, name, upload.bytes, upload.sha256, upload.stats
                )
                if idempotency_key is not None:
                    idempotency.remember(session, scope, idempotency_key, digest,
                                         dataset_id, ttl)
                session.commit()
            except IntegrityError:
                # A concurrent upload with the same key committed first: return its dataset.
                winner = idempotency.winner(session, scope, idempotency_key, digest, ttl)
                return DatasetOut.model_validate(
                    datasets.get_dataset(session, principal, winner)), False
            created = True
            return DatasetOut.model_validate(row), True
        finally:
            if not created:
                storage.delete(key)

    out, created = await run_in_threadpool(save)
    response.headers["Location"] = f"/v1/datasets/{out.id}"
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    elif idempotency_key is not None:
        await run_in_threadpool(idempotency.purge_expired, session, ttl)
    return out


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: AfterQuery = None,
) -> DatasetList:
    rows, has_more = datasets.list_datasets(session, principal, limit, after)
    return DatasetList(
        data=[DatasetOut.model_validate(r) for r in rows],
        has_more=has_more,
        next_after=rows[-1].id if has_more else None,
    )


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(
    dataset_id: DatasetIdPath, session: SessionDep, principal: PrincipalDep
) -> DatasetOut:
    return DatasetOut.model_validate(datasets.get_dataset(session, principal, dataset_id))
