"""The dry run of a submission, ``POST /v1/jobs?dry_run=true``: what a job would be, without
creating it.

:func:`estimate_job` runs the submission's checks (:func:`app.jobs.check_job`: datasets,
corpus size, ``init_from``, and the size limits of :func:`app.quotas.check_job_size`, so a
job that cannot fit is the same 422 ``job_too_large`` with the numbers here as at
submission), then answers with:

- ``spec``: the spec with every default filled in (and ``init_from`` resolved);
- ``vocab_size``: :func:`app.jobs.size_basis`: ``init_from``'s vocabulary, or
  :func:`core.estimate.vocab_bound` with the dataset's exact per-tokenizer statistics (the
  tokenizer is trained by the worker on the training split, so this is an upper bound) and
  where it comes from;
- ``parameters`` (:func:`core.estimate.param_count` over that vocabulary; a classify job:
  its head over the training dataset's labels, not a decoder);
- ``memory``: :func:`core.estimate.train_memory`, one training step's weights, gradients,
  optimizer state and activations of ``batch_size x seq_len`` (bytes), against the limit of
  the job's device class (``LMFORGE_MAX_TRAIN_MEMORY_BYTES_CPU``/``_CUDA``; ``auto``: the
  smaller), and whether it fits;
- ``seconds_per_step``: a calibration on the inference server (``lmforge serve``,
  ``POST /calibrate``: a few real training steps of the job's shape on random tokens, on that
  server's device, remembered per shape), and ``estimated_train_seconds`` = that times
  ``max_steps`` (evaluation and checkpoints not included; another stopping rule may end the
  run earlier). When the server cannot be asked (down, busy past the deadline, another device
  class, a shape too large for it) both are null and ``warnings`` says why.

Nothing is reserved: no job row, no queue message, no Idempotency-Key record, no quota use
(``warnings`` says when the queued-jobs quota would refuse the submission now).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app import jobs, quotas
from app.auth import Principal
from app.inference import InferenceClient, InferenceError
from core.estimate import device_class, param_count, train_memory, vocab_bound
from core.spec import JobSpec
from store.settings import Settings

#: Timed steps of a calibration (after one warm-up step).
CALIBRATION_STEPS = 3


class VocabEstimate(BaseModel):
    size: int = Field(description="an upper bound on the vocabulary's tokens")
    why: str = Field(description="where the bound comes from")


class MemoryEstimate(BaseModel):
    weights_bytes: int = Field(description="fp32 parameters, 4 bytes each")
    gradients_bytes: int
    optimizer_state_bytes: int = Field(description="Adam/AdamW: 2 fp32 copies of the "
                                                   "parameters; SGD with momentum: 1; SGD: 0")
    activations_bytes: int = Field(description="kept for the backward pass of one "
                                               "batch_size x seq_len step")
    total_bytes: int
    batch_size: int
    seq_len: int
    precision: str
    device_class: Literal["cpu", "cuda", "auto"]
    limit_bytes: int = Field(description="LMFORGE_MAX_TRAIN_MEMORY_BYTES_CPU or _CUDA (auto: "
                                         "the smaller)")
    fits: bool


class CalibrationOut(BaseModel):
    device: str = Field(description="where the steps ran (the inference server's device)")
    steps: int = Field(description="timed steps, after one warm-up step")
    tokens_per_s: float
    cached: bool = Field(description="an earlier calibration of the same shape")


class JobEstimate(BaseModel):
    """The answer of ``POST /v1/jobs?dry_run=true``."""

    dry_run: Literal[True] = True
    spec: dict[str, Any] = Field(description="the spec with every default filled in")
    vocab_size: VocabEstimate
    parameters: int
    max_parameters: int = Field(description="LMFORGE_MAX_PARAMS")
    memory: MemoryEstimate
    seconds_per_step: float | None = Field(description="one training step on the inference "
                                                       "server's device (null: not measured, "
                                                       "see warnings)")
    calibration: CalibrationOut | None
    max_steps: int
    estimated_train_seconds: float | None = Field(
        description="seconds_per_step x max_steps: training only (no evaluation or "
                    "checkpoints); another stopping rule may end the run sooner")
    warnings: list[str]


def _memory(spec: JobSpec, vocab: int, settings: Settings,
            num_labels: int | None = None) -> MemoryEstimate:
    parts = train_memory(spec, vocab, num_labels)
    cls = device_class(spec.training.device)
    limits = {"cpu": settings.max_train_memory_bytes_cpu,
              "cuda": settings.max_train_memory_bytes_cuda}
    limit = limits[cls] if cls is not None else min(limits.values())
    return MemoryEstimate(
        weights_bytes=parts.weights, gradients_bytes=parts.gradients,
        optimizer_state_bytes=parts.optimizer_state, activations_bytes=parts.activations,
        total_bytes=parts.total, batch_size=spec.training.batch_size,
        seq_len=spec.training.seq_len, precision=spec.training.precision,
        device_class=cls or "auto", limit_bytes=limit, fits=parts.total <= limit)


def calibrate(client: InferenceClient | None, spec: JobSpec, vocab: int, settings: Settings,
              warnings: list[str]) -> tuple[CalibrationOut, float] | None:
    """The calibration and its seconds per step, from the inference server; None with a
    ``warnings`` entry when it cannot be had."""
    if spec.task != "lm":
        warnings.append("seconds_per_step is measured for language-model jobs only")
        return None
    if client is None:
        warnings.append("seconds_per_step is not measured: no inference server is configured")
        return None
    payload = {"spec": spec.model_dump(mode="json"), "vocab_size": vocab,
               "steps": CALIBRATION_STEPS}
    try:
        out = client.post_json("/calibrate", payload, settings.inference_deadline_s)
    except InferenceError as exc:
        warnings.append(f"seconds_per_step is not measured: {exc.code}: {exc.message}")
        return None
    warnings.extend(_calibration_caveats(spec, str(out["device"])))
    cal = CalibrationOut(device=out["device"], steps=out["steps"],
                         tokens_per_s=out["tokens_per_s"], cached=out["cached"])
    return cal, float(out["seconds_per_step"])


def _calibration_caveats(spec: JobSpec, device: str) -> list[str]:
    if spec.training.device == "auto":
        return [f"seconds_per_step was measured on the inference server's {device}; the job "
                "(device auto) runs on whatever device its worker has"]
    return []


def estimate_job(session: Session, principal: Principal, spec: JobSpec, settings: Settings,
                 client: InferenceClient | None) -> JobEstimate:
    """The dry run of submitting ``spec`` as ``principal`` (module docstring). Raises what
    the submission's checks raise (422 ``validation_error``, ``corpus_too_small``,
    ``job_too_large``, ``eval_too_large``), never a quota error."""
    spec, stats = jobs.check_job(session, principal, spec, settings)
    warnings: list[str] = []
    try:
        quotas.check_job_quota(session, principal, settings)
    except quotas.QuotaExceeded as exc:
        warnings.append(f"a submission now would be refused (429 quota_exceeded): "
                        f"{exc.message}")
    if spec.task == "ppo":
        bound, num_labels = vocab_bound(spec, stats["train"]), None
    else:
        bound, num_labels = jobs.size_basis(session, principal, spec, stats["train"])
    memory = _memory(spec, bound.size, settings, num_labels)
    got = calibrate(client, spec, bound.size, settings, warnings)
    cal, seconds = got if got is not None else (None, None)
    t = spec.training
    return JobEstimate(
        spec=spec.model_dump(mode="json"),
        vocab_size=VocabEstimate(size=bound.size, why=bound.why),
        parameters=param_count(spec, bound.size, num_labels),
        max_parameters=settings.max_params,
        memory=memory,
        seconds_per_step=seconds,
        calibration=cal,
        max_steps=t.max_steps,
        estimated_train_seconds=None if seconds is None else seconds * t.max_steps,
        warnings=warnings,
    )
