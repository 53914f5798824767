"""Submission checks of a ``task: "classify"`` job (torch-free; called by :mod:`app.jobs`).

What the spec alone cannot check: its datasets are labelled, its ``class_weights`` name labels
that exist, and its ``init_from`` names a succeeded language-model job of the submitter's with
that checkpoint. With ``init_from`` the encoder's dimensions and the tokenizer come from that
job: fields the submitter left out take the checkpoint's values; fields given with other values
are a 422 naming them (an encoder of other dimensions could not take the checkpoint's
weights). The returned spec names the resolved checkpoint by id, so the worker reads exactly
the checkpoint checked here.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.datasets import spec_dataset
from core.errors import NotFound, ValidationFailed
from core.spec import JobSpec, TokenizerSpec
from store.models import Checkpoint, CheckpointKind, Job, JobStatus

# The encoder's shape: what a checkpoint's LSTM weights fix.
ENCODER_FIELDS = ("embed_dim", "hidden_dim", "num_layers")


def check_labelled_sources(session: Session, principal: Principal, spec: JobSpec) -> None:
    """422 naming the dataset field when a classify job's dataset is not labelled (another
    principal's or an unknown dataset: "does not exist", as for a language-model job), and
    naming ``classify.class_weights`` when it weighs a label the training dataset lacks."""
    assert spec.dataset is not None
    sources = [("dataset_id" if spec.dataset_id else "dataset.id", spec.dataset)]
    sources += [(f"{n}.id", getattr(spec, n)) for n in ("validation", "test")
                if getattr(spec, n) is not None]
    train_labels: dict[str, Any] | None = None
    for field, source in sources:
        if source.id is None:
            continue  # builtin: refused by the spec; path: refused by app.jobs
        row = spec_dataset(session, principal, source.id, field)
        if row.kind != "labelled":
            raise ValidationFailed(
                f"dataset {source.id!r} is a {row.kind} dataset; task 'classify' needs "
                "a labelled one (upload JSON Lines with \"text\" and \"label\", or CSV)",
                code="dataset_not_labelled", field=field)
        if source is spec.dataset:
            train_labels = row.labels
    assert spec.classify is not None
    weights = spec.classify.class_weights
    if isinstance(weights, dict) and train_labels:
        unknown = sorted(set(weights) - set(train_labels))
        if unknown:
            raise ValidationFailed(
                f"class_weights names labels the training dataset does not have: "
                f"{unknown[:5]} (its labels: {sorted(train_labels)[:20]})",
                field="classify.class_weights")


def adopt_checkpoint_model(spec: JobSpec, source_spec: JobSpec, data: dict[str, Any],
                           fields: tuple[str, ...]) -> None:
    """Put ``init_from``'s ``model.<fields>`` and tokenizer (``source_spec``'s) into ``data``
    (``spec``'s JSON): a job built on a checkpoint keeps its shapes and vocabulary. Raises
    :class:`ValidationFailed` (422 ``init_from_mismatch``) naming ``model.<field>`` or
    ``tokenizer`` when ``spec`` gives one with another value."""
    given = spec.model.model_fields_set
    for name in fields:
        theirs = getattr(source_spec.model, name)
        if name in given and getattr(spec.model, name) != theirs:
            raise ValidationFailed(
                f"model.{name} is {getattr(spec.model, name)} but init_from's checkpoint has "
                f"{theirs}; leave it out to take the checkpoint's",
                code="init_from_mismatch", field=f"model.{name}")
        data["model"][name] = theirs
    theirs_tok = source_spec.tokenizer.model_dump(mode="json")
    if "tokenizer" in spec.model_fields_set and spec.tokenizer != TokenizerSpec(**theirs_tok):
        raise ValidationFailed(
            f"tokenizer differs from init_from's ({theirs_tok}); a job built on a checkpoint "
            "uses its tokenizer: leave 'tokenizer' out",
            code="init_from_mismatch", field="tokenizer")
    data["tokenizer"] = theirs_tok


def _resolve_checkpoint(session: Session, job: Job, name: str) -> Checkpoint:
    if name in ("best", "last"):
        kind = CheckpointKind.BEST if name == "best" else CheckpointKind.LAST
        ckpt = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.kind == kind)
            .order_by(Checkpoint.step.desc()).limit(1))
    else:
        ckpt = session.get(Checkpoint, name)
        if ckpt is not None and ckpt.job_id != job.id:
            ckpt = None
    if ckpt is None:
        raise ValidationFailed(f"job {job.id} has no checkpoint {name!r}",
                               field="init_from.checkpoint")
    return ckpt


def resolve_init_from(session: Session, principal: Principal, spec: JobSpec) -> JobSpec:
    """``spec`` with its encoder dimensions and tokenizer taken from ``init_from``'s job and
    ``init_from.checkpoint`` replaced by the resolved checkpoint's id; ``spec`` unchanged
    without ``init_from``.

    Raises :class:`ValidationFailed` (422) naming ``init_from.job_id`` (no such job of the
    principal's, not succeeded, or not a language model), ``init_from.checkpoint`` (no such
    checkpoint of that job), ``model.<field>`` or ``tokenizer`` (given with a value other
    than the checkpoint's)."""
    init = spec.init_from
    if init is None:
        return spec
    from app.jobs import get_job  # app.jobs imports this module

    try:
        source = get_job(session, principal, init.job_id)
    except NotFound:
        raise ValidationFailed(f"job {init.job_id!r} does not exist",
                               field="init_from.job_id") from None
    if source.status != JobStatus.SUCCEEDED:
        raise ValidationFailed(
            f"job {init.job_id} is {source.status.value}; init_from needs a succeeded job",
            code="init_from_not_ready", field="init_from.job_id")
    try:
        source_spec = JobSpec.model_validate(source.spec)
    except ValidationError:
        raise ValidationFailed(f"job {init.job_id}'s spec can no longer be read; init_from "
                               "cannot use it", field="init_from.job_id") from None
    if source_spec.task != "lm":
        raise ValidationFailed(
            f"job {init.job_id} is a {source_spec.task} job; init_from needs a language model",
            field="init_from.job_id")
    ckpt = _resolve_checkpoint(session, source, init.checkpoint)

    data = spec.model_dump(mode="json")
    adopt_checkpoint_model(spec, source_spec, data, ENCODER_FIELDS)
    data["init_from"] = {"job_id": source.id, "checkpoint": ckpt.id}
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:  # the checkpoint's sizes do not fit the rest of the spec
        raise ValidationFailed(f"the spec with init_from's sizes is not valid: "
                               f"{exc.errors()[0]['msg']}", field="init_from.job_id") from None
