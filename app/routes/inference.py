"""``POST /v1/jobs/{id}/generate``, ``/score`` and ``/classify``: use a trained model.

The API stays torch-free: it resolves the job (the caller's own; 404 otherwise), its task and
the checkpoint (``best``, ``last`` or an id) from the database, checks the request's bounds
(``LMFORGE_INFERENCE_MAX_*``: 422 naming the field past them), then asks the inference server
(``lmforge serve``) through :class:`app.inference.InferenceClient` with a deadline of
``LMFORGE_INFERENCE_DEADLINE_S`` or the request's lower ``deadline_s`` (504
``deadline_exceeded`` past it; 503 ``inference_unavailable`` when the server is down).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.auth import Principal, PrincipalDep
from app.deps import SessionDep, SettingsDep
from app.http_errors import ErrorBody
from app.inference import InferenceClient
from app.params import JobIdPath
from core.errors import Conflict, NotFound, ValidationFailed, WrongTask
from core.inference import (
    ClassifyParams,
    ClassifyResult,
    GenerateParams,
    GenerateResult,
    ScoreParams,
    ScoreResult,
)
from core.spec import LM_CHECKPOINT_TASKS
from store.models import Checkpoint, CheckpointKind, Job
from store.settings import Settings

router = APIRouter(prefix="/jobs", tags=["inference"])

# ``checkpoint``: "best", "last" or a checkpoint id as the service makes them.
CHECKPOINT_PATTERN = r"^(best|last|[a-z]+_[0-9a-f]{32})$"


def get_inference_client(request: Request) -> InferenceClient:
    """``app.state.inference_client`` when set (tests), else a client of
    ``LMFORGE_INFERENCE_URL``."""
    client = getattr(request.app.state, "inference_client", None)
    if client is None:
        client = InferenceClient(request.app.state.settings.inference_url)
        request.app.state.inference_client = client
    return client


InferenceClientDep = Annotated[InferenceClient, Depends(get_inference_client)]


class _Common(BaseModel):
    checkpoint: str = Field(default="best", max_length=40, pattern=CHECKPOINT_PATTERN,
                            description="best (lowest validation loss), last (the newest last "
                                        "checkpoint) or a checkpoint id (ckpt_...)")
    deadline_s: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                     description="seconds; at most LMFORGE_INFERENCE_DEADLINE_S "
                                                 "(30 by default), which also applies when "
                                                 "this is null or larger")


class GenerateBody(GenerateParams, _Common):
    """Limits (422 past them): ``prompt`` at most LMFORGE_INFERENCE_MAX_PROMPT_CHARS (10,000)
    characters, ``max_new_tokens`` at most LMFORGE_INFERENCE_MAX_NEW_TOKENS (2,000),
    ``num_samples`` at most LMFORGE_INFERENCE_MAX_SAMPLES (16)."""


class ScoreBody(ScoreParams, _Common):
    """``text`` has at most LMFORGE_INFERENCE_MAX_TEXT_CHARS (100,000) characters (422)."""


class ClassifyBody(ClassifyParams, _Common):
    """At most LMFORGE_INFERENCE_MAX_TEXTS (256) texts of at most
    LMFORGE_INFERENCE_MAX_TEXT_CHARS (100,000) characters each (422)."""


class _Used(BaseModel):
    job_id: str
    checkpoint_kind: str = Field(description="best, last or periodic")
    checkpoint_step: int


class GenerateOut(GenerateResult, _Used):
    pass


class ScoreOut(ScoreResult, _Used):
    pass


class ClassifyOut(ClassifyResult, _Used):
    pass


_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such job (or not yours), or no such "
                                             "checkpoint of it"},
    409: {"model": ErrorBody, "description": "the job has no such checkpoint yet "
                                             "(no_checkpoint), or its task does not fit the "
                                             "route (wrong_task)"},
    422: {"model": ErrorBody, "description": "an invalid request or one past the limits; "
                                             "error.field names the field"},
    501: {"model": ErrorBody, "description": "the inference server cannot do this yet"},
    502: {"model": ErrorBody, "description": "the inference server failed (inference_failed)"},
    503: {"model": ErrorBody, "description": "the inference server is not reachable "
                                             "(inference_unavailable), the checkpoint's blob "
                                             "is missing or damaged, or the database is "
                                             "unavailable"},
    504: {"model": ErrorBody, "description": "the deadline passed (deadline_exceeded)"},
}


def resolve_checkpoint(session: Session, principal: Principal, job_id: str, which: str
                       ) -> tuple[Job, Checkpoint]:
    """The job (the caller's; :class:`NotFound` otherwise) and its checkpoint ``which``:
    ``best``/``last`` is the newest checkpoint of that kind (:class:`Conflict`
    ``no_checkpoint`` when there is none yet), an id must be one of the job's
    (:class:`NotFound`)."""
    job = jobs.get_job(session, principal, job_id)
    if which in (CheckpointKind.BEST.value, CheckpointKind.LAST.value):
        row = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job.id, Checkpoint.kind == CheckpointKind(which))
            .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
            .limit(1)
        ).first()
        if row is None:
            raise Conflict(f"job {job.id} has no {which} checkpoint yet (it is "
                           f"{job.status.value}); wait until it has written one, or name "
                           "another checkpoint (GET /v1/jobs/{id}/checkpoints)",
                           code="no_checkpoint", field="checkpoint")
        return job, row
    ckpt = session.get(Checkpoint, which)
    if ckpt is None or ckpt.job_id != job.id:
        raise NotFound(f"checkpoint {which!r} of job {job.id} not found", field="checkpoint")
    return job, ckpt


def job_task(job: Job) -> str:
    """The job's ``spec.task`` (``lm`` for specs without one)."""
    return str((job.spec or {}).get("task") or "lm")




def _require_task(job: Job, task: str, route: str) -> None:
    actual = job_task(job)
    if actual != task and not (task == "lm" and actual in LM_CHECKPOINT_TASKS):
        other = "classify" if actual == "classify" else "generate and score"
        raise WrongTask(f"{route} does not apply to job {job.id}: its task is {actual!r}, and "
                        f"{route} needs a {task!r} job; use {other} instead", field="task")


def _limit(value: int, limit: int, field: str, what: str, setting: str) -> None:
    if value > limit:
        raise ValidationFailed(f"{field}: {value} {what} is over the limit of {limit} "
                               f"({setting})", field=field)


def _deadline(settings: Settings, asked: float | None) -> float:
    limit = settings.inference_deadline_s
    return limit if asked is None else min(asked, limit)


def _payload(ckpt: Checkpoint, params: BaseModel) -> dict[str, Any]:
    body = params.model_dump(mode="json", exclude={"checkpoint", "deadline_s"})
    body["checkpoint"] = {"id": ckpt.id, "storage_key": ckpt.storage_key,
                          "sha256": ckpt.sha256}
    return body


def _used(job: Job, ckpt: Checkpoint) -> dict[str, Any]:
    return {"job_id": job.id, "checkpoint_kind": ckpt.kind.value, "checkpoint_step": ckpt.step}


@router.post("/{job_id}/generate", response_model=GenerateOut, responses=_RESPONSES)
def generate(job_id: JobIdPath, body: GenerateBody, session: SessionDep,
             principal: PrincipalDep, settings: SettingsDep,
             client: InferenceClientDep) -> GenerateOut:
    """Sample ``num_samples`` continuations of ``prompt`` from a language-model job's
    checkpoint. Each ``samples[i].text`` is the completion without the prompt; ``<unk>`` is
    never sampled and no text ends in half a character. Sampling: ``temperature``, then
    ``top_k``, then nucleus ``top_p`` (Holtzman et al. 2020); ``seed`` makes it
    reproducible."""
    job, ckpt = resolve_checkpoint(session, principal, job_id, body.checkpoint)
    _require_task(job, "lm", "generate")
    if "max_new_tokens" not in body.model_fields_set:  # the default never exceeds the limit
        body.max_new_tokens = min(body.max_new_tokens, settings.inference_max_new_tokens)
    _limit(len(body.prompt), settings.inference_max_prompt_chars, "prompt", "characters",
           "LMFORGE_INFERENCE_MAX_PROMPT_CHARS")
    _limit(body.max_new_tokens, settings.inference_max_new_tokens, "max_new_tokens", "tokens",
           "LMFORGE_INFERENCE_MAX_NEW_TOKENS")
    _limit(body.num_samples, settings.inference_max_samples, "num_samples", "samples",
           "LMFORGE_INFERENCE_MAX_SAMPLES")
    session.close()  # no database connection held while the model runs
    out = client.post_json("/generate", _payload(ckpt, body),
                           _deadline(settings, body.deadline_s))
    return GenerateOut.model_validate({**out, **_used(job, ckpt)})


@router.post("/{job_id}/score", response_model=ScoreOut, responses=_RESPONSES)
def score(job_id: JobIdPath, body: ScoreBody, session: SessionDep, principal: PrincipalDep,
          settings: SettingsDep, client: InferenceClientDep) -> ScoreOut:
    """Score ``text`` with a language-model job's checkpoint: ``loss`` is the mean
    cross-entropy in nats per predicted token (every token but the first, from a zero hidden
    state), ``ppl`` = exp(loss) (null when that overflows), ``bpc`` = loss / ln 2 for char
    jobs, and each token's loss in ``per_token``."""
    job, ckpt = resolve_checkpoint(session, principal, job_id, body.checkpoint)
    _require_task(job, "lm", "score")
    _limit(len(body.text), settings.inference_max_text_chars, "text", "characters",
           "LMFORGE_INFERENCE_MAX_TEXT_CHARS")
    session.close()
    out = client.post_json("/score", _payload(ckpt, body), _deadline(settings, body.deadline_s))
    return ScoreOut.model_validate({**out, **_used(job, ckpt)})


@router.post("/{job_id}/classify", response_model=ClassifyOut, responses=_RESPONSES)
def classify(job_id: JobIdPath, body: ClassifyBody, session: SessionDep,
             principal: PrincipalDep, settings: SettingsDep,
             client: InferenceClientDep) -> ClassifyOut:
    """Label ``texts`` with a classification job's checkpoint (``task: "classify"``): one
    prediction per text, its ``label`` and the ``probabilities`` of every label."""
    job, ckpt = resolve_checkpoint(session, principal, job_id, body.checkpoint)
    _require_task(job, "classify", "classify")
    _limit(len(body.texts), settings.inference_max_texts, "texts", "texts",
           "LMFORGE_INFERENCE_MAX_TEXTS")
    for i, t in enumerate(body.texts):
        _limit(len(t), settings.inference_max_text_chars, f"texts.{i}", "characters",
               "LMFORGE_INFERENCE_MAX_TEXT_CHARS")
    session.close()
    out = client.post_json("/classify", _payload(ckpt, body),
                           _deadline(settings, body.deadline_s))
    return ClassifyOut.model_validate({**out, **_used(job, ckpt)})
