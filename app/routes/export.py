"""``GET /v1/jobs/{id}/checkpoints/{cid}/export?format=safetensors|onnx``: a trained model as a
file to use outside the service.

The API resolves the job (the caller's own; 404 otherwise) and the checkpoint (an id, or
``best``/``last``: the newest of that kind) from the database, then asks the inference server
(``lmforge serve``, ``POST /export``) for the file, which it builds from the checkpoint with
:mod:`worker.engine.export`: ``safetensors``, the weights alone with the model's
configuration and tokenizer in the header (load it with ``lmforge.load``), or ``onnx`` (token
ids and the LSTM state in, logits and the state out; the tokenizer in ``metadata_props``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import AfterValidator

from app.auth import PrincipalDep
from app.deps import SessionDep
from app.http_errors import ErrorBody
from app.params import ID_MAX_CHARS, JobIdPath
from app.routes.files import content_disposition
from app.routes.inference import (
    InferenceClientDep,
    job_task,
    resolve_checkpoint,
)
from core.errors import WrongTask
from core.spec import LM_CHECKPOINT_TASKS, NO_CONTROL_PATTERN, check_text

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: Seconds the inference server gets to build an export (an ONNX export of a large model
#: takes a while; there is no user-facing deadline for a download).
EXPORT_DEADLINE_S = 300.0
SUFFIXES = {"safetensors": "safetensors", "onnx": "onnx"}

ExportFormat = Literal["safetensors", "onnx"]
CheckpointRefPath = Annotated[
    str,
    Path(description="a checkpoint id (ckpt_...), or best / last: the job's newest checkpoint "
                     "of that kind", min_length=1, max_length=ID_MAX_CHARS,
         json_schema_extra={"pattern": NO_CONTROL_PATTERN}),
    AfterValidator(check_text),
]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}},
          "description": "the file (Content-Disposition names it; X-Export-SHA256 is its "
                         "sha256, hex)"},
    404: {"model": ErrorBody, "description": "no such job (or not yours), or no such "
                                             "checkpoint of it"},
    409: {"model": ErrorBody, "description": "the job has no best/last checkpoint yet "
                                             "(no_checkpoint), or is not a language-model job "
                                             "(wrong_task)"},
    422: {"model": ErrorBody, "description": "an unknown format"},
    502: {"model": ErrorBody, "description": "the inference server failed (inference_failed)"},
    503: {"model": ErrorBody, "description": "the inference server is not reachable "
                                             "(inference_unavailable), or the checkpoint's "
                                             "blob is missing or damaged"},
    504: {"model": ErrorBody, "description": "the export took longer than "
                                             f"{EXPORT_DEADLINE_S:g} s"},
}


@router.get("/{job_id}/checkpoints/{checkpoint_id}/export", response_class=Response,
            responses=_RESPONSES, operation_id="export_checkpoint")
def export_checkpoint(
    job_id: JobIdPath,
    checkpoint_id: CheckpointRefPath,
    session: SessionDep,
    principal: PrincipalDep,
    client: InferenceClientDep,
    format: Annotated[ExportFormat, Query(description="safetensors (weights, model config "
                                                      "and tokenizer; lmforge.load reads "
                                                      "it) or onnx")] = "safetensors",
) -> Response:
    """The checkpoint's model as ``format`` (module docstring), named
    ``<job>-<kind>-step<step>.<format>``."""
    job, ckpt = resolve_checkpoint(session, principal, job_id, checkpoint_id)
    if job_task(job) not in LM_CHECKPOINT_TASKS:
        raise WrongTask(f"export covers language-model jobs; job {job.id} is a "
                        f"{job_task(job)!r} job", field="checkpoint_id")
    name = f"{job.id}-{ckpt.kind.value}-step{ckpt.step}.{SUFFIXES[format]}"
    payload = {"checkpoint": {"id": ckpt.id, "storage_key": ckpt.storage_key,
                              "sha256": ckpt.sha256},
               "format": format}
    session.close()  # no database connection held while the server exports
    data, headers = client.post_bytes("/export", payload, EXPORT_DEADLINE_S)
    out = {"Content-Disposition": content_disposition(name)}
    if "x-export-sha256" in headers:
        out["X-Export-SHA256"] = headers["x-export-sha256"]
    return Response(content=data, media_type="application/octet-stream", headers=out)
