"""``/v1/datasets``: upload (text, compressed, JSONL, CSV/TSV, several files, labelled), read
and delete datasets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from app import datasets, idempotency, quotas
from app.auth import PrincipalDep
from app.deps import IdempotencyKeyHeader, SessionDep, SettingsDep, StorageDep
from app.http_errors import ErrorBody
from app.params import AfterQuery, DatasetIdPath
from app.routes.uploads import receive_files
from app.schemas import DatasetList, DatasetOut
from core.errors import ValidationFailed
from core.ingest import IngestOptions, check_options
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
                        # The bytes must be UTF-8 text (422 naming the byte offset otherwise),
                        # plain or compressed; several "file" parts are one dataset.
                        "file": {"type": "string", "contentMediaType": "text/plain",
                                 "minLength": 1,
                                 "description": "UTF-8 text, JSON Lines, CSV or TSV, plain or "
                                                "gzip/Zstandard-compressed; repeat the part "
                                                "for several files (joined in order)"},
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

_FIELD = {"min_length": 1, "max_length": 200, "pattern": NO_CONTROL_PATTERN}
FormatQuery = Annotated[Literal["text", "jsonl", "csv", "tsv"], Query(
    description="the files' format: text (UTF-8 text), jsonl (one JSON object per line), csv "
                "(with quoting) or tsv (tab-separated, no quoting)")]
TextFieldQuery = Annotated[str | None, Query(
    description="jsonl/csv/tsv: the field (column) holding the text (default \"text\"; "
                "format text: a 422, a text file has no fields)", **_FIELD)]
LabelFieldQuery = Annotated[str | None, Query(
    description="jsonl/csv/tsv: the field (column) holding the label; makes the dataset "
                "labelled (JSON Lines of {text, label})", **_FIELD)]
ColumnsQuery = Annotated[str | None, Query(
    description="csv/tsv without a header row: the columns' names, comma-separated (e.g. "
                "text,label for SST-2's sentence<TAB>label files)",
    min_length=1, max_length=2000, pattern=NO_CONTROL_PATTERN)]


def _options(fmt: str, text_field: str | None, label_field: str | None,
             columns: str | None) -> IngestOptions:
    if fmt == "text" and text_field is not None:  # else silently unused
        raise ValidationFailed("text_field needs a format with fields: jsonl, csv or tsv "
                               "(format=text stores each line as it is)", field="text_field")
    cols = None if columns is None else tuple(c.strip() for c in columns.split(","))
    options = IngestOptions(format=fmt, text_field=text_field or "text",
                            label_field=label_field,
                            columns=cols)
    check_options(options)
    return options


@router.post(
    "", status_code=201, response_model=DatasetOut, openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": DatasetOut, "description": "a retry with the same Idempotency-Key and "
                                                  "file: the dataset the first request made"},
        409: {"model": ErrorBody, "description": "the Idempotency-Key was used with another "
                                                 "upload (idempotency_key_reused)"},
        413: {"model": ErrorBody, "description": "larger than LMFORGE_MAX_UPLOAD_BYTES "
                                                 "(compressed files: once decompressed)"},
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
    format: FormatQuery = "text",
    text_field: TextFieldQuery = None,
    label_field: LabelFieldQuery = None,
    columns: ColumnsQuery = None,
) -> DatasetOut:
    """Store an uploaded dataset (413 past ``LMFORGE_MAX_UPLOAD_BYTES``, of the files as sent
    and once decompressed): one or more ``file`` parts (joined in order), each plain or
    gzip/Zstandard-compressed (told by its first bytes), in ``format`` ``text``, ``jsonl``,
    ``csv`` or ``tsv``; with ``label_field`` a labelled dataset (README "Datasets";
    ``core.ingest`` has the rules). Bad input is a 422 naming the file, line and field.

    With ``Idempotency-Key``: a retry with the same key, name, file name and content returns
    the dataset the first request made (200, ``Idempotent-Replayed: true``; the new copy is
    discarded); the same key with another upload is 409 (``idempotency_key_reused``)."""
    # Over the dataset-bytes quota already: refused before a byte is read (409).
    options = _options(format, text_field, label_field, columns)
    await run_in_threadpool(quotas.check_dataset_quota, session, principal, settings, 1)
    dataset_id = datasets.new_dataset_id()
    key = datasets.storage_key(dataset_id)
    received = await receive_files(request, settings.max_upload_bytes)
    try:
        upload = await run_in_threadpool(datasets.store_upload, storage, key, received.files,
                                         options, settings.max_upload_bytes)
    finally:
        received.close()
    name = (received.name or received.filename or dataset_id)[:200]
    request_fields: dict[str, object] = {
        "name": received.name, "filename": received.filename, "sha256": upload.sha256,
        "bytes": upload.bytes}
    if (options != IngestOptions()) or len(received.files) > 1:  # as before for one text file
        request_fields.update(filenames=received.filenames, format=options.format,
                              text_field=options.text_field, label_field=options.label_field,
                              columns=options.columns)
    digest = idempotency.request_digest(request_fields)
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
                    session, principal, dataset_id, name, upload.bytes, upload.sha256,
                    upload.text, upload,
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


@router.delete(
    "/{dataset_id}", status_code=204,
    responses={
        404: {"model": ErrorBody, "description": "no such dataset (or another principal's)"},
        409: {"model": ErrorBody, "description": "a queued or running job uses it "
                                                 "(dataset_in_use, naming the jobs)"},
    },
)
def delete_dataset(
    dataset_id: DatasetIdPath, session: SessionDep, storage: StorageDep,
    principal: PrincipalDep,
) -> Response:
    """Delete the dataset: its row, then its stored file. 409 ``dataset_in_use`` while a
    queued or running job reads it (as ``dataset``, ``validation``, ``test`` or
    ``model.pretrained_embeddings``); finished jobs keep their results and checkpoints."""
    datasets.delete_dataset(session, storage, principal, dataset_id)
    return Response(status_code=204)
