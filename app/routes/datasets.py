"""``/v1/datasets``: upload and read text datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app import datasets
from app.deps import SessionDep, SettingsDep, StorageDep
from app.routes.uploads import receive_text_file
from app.schemas import DatasetList, DatasetOut

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
                        "file": {"type": "string", "format": "binary",
                                 "description": "UTF-8 text"},
                        "name": {"type": "string", "maxLength": 200},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=_UPLOAD_BODY)
async def upload_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> DatasetOut:
    """Stream a UTF-8 text file to storage (413 past ``LMFORGE_MAX_UPLOAD_BYTES``)."""
    dataset_id = datasets.new_dataset_id()
    key = datasets.storage_key(dataset_id)
    upload = await receive_text_file(request, storage, key, settings.max_upload_bytes)
    name = (upload.name or upload.filename or dataset_id)[:200]

    def save() -> DatasetOut:
        try:
            row = datasets.add_dataset(
                session, dataset_id, name, upload.bytes, upload.sha256, upload.stats
            )
            session.commit()
        except BaseException:
            storage.delete(key)
            raise
        return DatasetOut.model_validate(row)

    out = await run_in_threadpool(save)
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"
    return out


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: str | None = None,
) -> DatasetList:
    rows, has_more = datasets.list_datasets(session, limit, after)
    return DatasetList(
        data=[DatasetOut.model_validate(r) for r in rows],
        has_more=has_more,
        next_after=rows[-1].id if has_more else None,
    )


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(datasets.get_dataset(session, dataset_id))
