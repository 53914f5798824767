"""Submission checks of a ``task: "ppo"`` job (torch-free; called by :mod:`app.jobs`).

What the spec alone cannot check (docs/ppo.md):

- ``init_from`` names a succeeded language-model job of the submitter's (or a succeeded PPO
  job: its checkpoints are language-model checkpoints too) with that checkpoint. The policy
  and the reference are that checkpoint, so its model and tokenizer are the job's: ``model``
  and ``tokenizer`` fields left out take the checkpoint's values; fields given with other
  values are a 422 naming them.
- ``ppo.prompts.dataset_id`` is a text dataset of the submitter's holding at least one
  non-blank line; ``ppo.prompts.from_corpus`` needs the training text of the language model
  at the start of the ``init_from`` chain to be still there.
- ``ppo.reward``'s ``lm_loglik`` job is a succeeded language-model (or PPO) job of the
  submitter's, and its ``classifier`` job a succeeded classification job of the submitter's
  whose labels include ``label``; each with that checkpoint.
- Fields of a language-model job that a PPO job does not read (``val_fraction``,
  ``test_fraction``, ``training.batch_size``/``seq_len``/``eval_tokens``/
  ``state_reset_prob``, ``schedule.kind`` ``plateau``: :data:`IGNORED_FIELDS`) are refused
  when given with a value other than their default, naming them, rather than silently
  ignored.
- The job's size: :func:`check_ppo_size` (the policy, its reference and one rollout batch).

The returned spec names every checkpoint by id (``init_from.checkpoint``,
``ppo.reward.checkpoint``), so the worker reads exactly the checkpoints checked here.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.auth import Principal
from app.classify import (
    ENCODER_FIELDS,
    _resolve_checkpoint,
    adopt_checkpoint_model,
)
from app.datasets import get_dataset, spec_dataset
from core.errors import NotFound, ValidationFailed
from core.estimate import device_class, train_memory, vocab_bound
from core.spec import LM_CHECKPOINT_TASKS, JobSpec, TrainingSpec
from core.textstats import TextStats, builtin_stats
from store.models import Checkpoint, Job, JobStatus
from store.settings import Settings

# A PPO job's model is its init_from checkpoint's: these ``model`` fields must agree with it.
MODEL_FIELDS = (*ENCODER_FIELDS, "dropout", "tie_weights", "init_range")

# Fields of a language-model job that a PPO job does not read: (section, field, why). Given
# with a value other than the default, they are a 422 naming them.
IGNORED_FIELDS: tuple[tuple[str | None, str, str], ...] = (
    (None, "val_fraction", "a PPO job holds out no text (its data is ppo.prompts)"),
    (None, "test_fraction", "a PPO job holds out no text (its data is ppo.prompts)"),
    ("training", "batch_size", "a PPO iteration samples ppo.rollout_batch_size responses"),
    ("training", "seq_len", "a PPO job's sequences are its prompts and ppo.response_length "
                            "tokens"),
    ("training", "eval_tokens", "a PPO job has no validation split"),
    ("training", "state_reset_prob", "every rollout starts from the zero state"),
)

# How far an init_from chain (PPO job -> PPO job -> ... -> language model) is followed.
MAX_CHAIN = 32


def _default(section: str | None, name: str) -> Any:
    return (JobSpec if section is None else TrainingSpec).model_fields[name].default


def _refuse_ignored_fields(spec: JobSpec) -> None:
    for section, name, why in IGNORED_FIELDS:
        owner = spec if section is None else getattr(spec, section)
        field = name if section is None else f"{section}.{name}"
        if name in owner.model_fields_set and getattr(owner, name) != _default(section, name):
            raise ValidationFailed(
                f"{field} does not apply to task 'ppo' ({why}); leave it out",
                code="not_applicable", field=field)
    if spec.schedule.kind == "plateau":
        raise ValidationFailed(
            "schedule.kind 'plateau' does not apply to task 'ppo' (it steps on a validation "
            "loss, which a PPO job does not have); use constant, cosine or step",
            code="not_applicable", field="schedule.kind")


def _succeeded_job(session: Session, principal: Principal, job_id: str, field: str,
                   tasks: Collection[str], what: str) -> tuple[Job, JobSpec]:
    """The principal's succeeded job ``job_id`` of one of ``tasks`` and its spec; a 422
    naming ``field`` otherwise."""
    from app.jobs import get_job  # app.jobs imports this module

    try:
        job = get_job(session, principal, job_id)
    except NotFound:
        raise ValidationFailed(f"job {job_id!r} does not exist", field=field) from None
    if job.status != JobStatus.SUCCEEDED:
        raise ValidationFailed(f"job {job_id} is {job.status.value}; {what} needs a succeeded "
                               "job", code="job_not_ready", field=field)
    try:
        job_spec = JobSpec.model_validate(job.spec)
    except ValidationError:
        raise ValidationFailed(f"job {job_id}'s spec can no longer be read; {what} cannot use "
                               "it", field=field) from None
    if job_spec.task not in tasks:
        raise ValidationFailed(
            f"job {job_id} is a {job_spec.task} job; {what} needs a "
            f"{' or '.join(repr(t) for t in sorted(tasks))} job", code="wrong_task", field=field)
    return job, job_spec


def _checkpoint(session: Session, job: Job, name: str, field: str) -> Checkpoint:
    try:
        return _resolve_checkpoint(session, job, name)
    except ValidationFailed as exc:
        raise ValidationFailed(exc.message, field=field) from None


def language_model_root(session: Session, principal: Principal,
                        spec: JobSpec) -> tuple[Job, JobSpec]:
    """The language-model job at the start of ``spec``'s ``init_from`` chain (a PPO job's
    ``init_from`` may be another PPO job) and its spec. 422 naming ``init_from.job_id`` when
    the chain is broken (a job gone or unreadable) or longer than :data:`MAX_CHAIN`."""
    from app.jobs import get_job

    assert spec.init_from is not None
    job_id, job_spec = spec.init_from.job_id, spec
    for _ in range(MAX_CHAIN):
        if job_spec.init_from is None:
            raise ValidationFailed(f"the init_from chain ends at job {job_id}, which is not a "
                                   "language model", field="init_from.job_id")
        job_id = job_spec.init_from.job_id
        try:
            job = get_job(session, principal, job_id)
            job_spec = JobSpec.model_validate(job.spec)
        except (NotFound, ValidationError):
            raise ValidationFailed(f"the init_from chain reaches job {job_id!r}, which is gone "
                                   "or unreadable", field="init_from.job_id") from None
        if job_spec.task == "lm":
            return job, job_spec
    raise ValidationFailed(f"the init_from chain is longer than {MAX_CHAIN} jobs",
                           field="init_from.job_id")


def training_text_stats(session: Session, principal: Principal,
                        root: JobSpec) -> TextStats | None:
    """The statistics of the training text of language-model job spec ``root`` (its dataset
    row, or the built-in corpus); None when its dataset is gone."""
    assert root.dataset is not None
    if root.dataset.builtin is not None:
        return builtin_stats(root.dataset.builtin)
    if root.dataset.id is None:
        return None
    try:
        d = get_dataset(session, principal, root.dataset.id)
    except NotFound:
        return None
    return TextStats(d.num_chars, d.num_lines, d.num_words, d.bytes)


def _resolve_policy(session: Session, principal: Principal, spec: JobSpec,
                    data: dict[str, Any]) -> None:
    """Put the init_from checkpoint's id, model and tokenizer into ``data`` (the spec's
    JSON), refusing ``model``/``tokenizer`` fields given with other values."""
    assert spec.init_from is not None
    source, source_spec = _succeeded_job(session, principal, spec.init_from.job_id,
                                         "init_from.job_id", LM_CHECKPOINT_TASKS, "init_from")
    ckpt = _checkpoint(session, source, spec.init_from.checkpoint, "init_from.checkpoint")
    adopt_checkpoint_model(spec, source_spec, data, MODEL_FIELDS)
    data["init_from"] = {"job_id": source.id, "checkpoint": ckpt.id}


def _check_prompts(session: Session, principal: Principal, spec: JobSpec) -> None:
    assert spec.ppo is not None
    prompts = spec.ppo.prompts
    if prompts.dataset_id is not None:
        field = "ppo.prompts.dataset_id"
        row = spec_dataset(session, principal, prompts.dataset_id, field)
        if row.kind != "text":
            raise ValidationFailed(
                f"dataset {prompts.dataset_id!r} is a {row.kind} dataset; the prompts "
                "are a text dataset, one prompt per line", code="dataset_not_text",
                field=field)
        if row.num_words == 0:
            raise ValidationFailed(f"dataset {prompts.dataset_id!r} has no prompts (every "
                                   "line is blank)", code="no_prompts", field=field)
    elif prompts.from_corpus is not None:
        _, root = language_model_root(session, principal, spec)
        if training_text_stats(session, principal, root) is None:
            raise ValidationFailed(
                "ppo.prompts.from_corpus reads the training text of the language model "
                f"init_from starts from, and its dataset {root.dataset_id!r} is gone; upload "
                "prompts and give ppo.prompts.dataset_id", code="dataset_gone",
                field="ppo.prompts.from_corpus")


def _resolve_reward(session: Session, principal: Principal, spec: JobSpec,
                    data: dict[str, Any]) -> None:
    assert spec.ppo is not None
    reward = spec.ppo.reward
    if reward.kind == "char_fraction":
        # One token of the policy's tokenizer (init_from's, put into data by
        # _resolve_policy): a character or a word; whether it is in the vocabulary is only
        # known from the checkpoint file, so the worker checks that (invalid_spec).
        kind = data["tokenizer"]["kind"]
        if (kind == "char" and len(reward.target) != 1) or (
                kind == "word" and any(c.isspace() for c in reward.target)):
            raise ValidationFailed(
                f"ppo.reward.target {reward.target!r} must be one token of init_from's "
                f"{kind} tokenizer: " + ("one character" if kind == "char" else
                                          "one word, without whitespace"),
                code="invalid_target", field="ppo.reward.target")
        return
    if reward.kind == "lm_loglik":
        job, _ = _succeeded_job(session, principal, reward.job_id, "ppo.reward.job_id",
                                LM_CHECKPOINT_TASKS, "the lm_loglik reward")
    elif reward.kind == "classifier":
        job, _ = _succeeded_job(session, principal, reward.job_id, "ppo.reward.job_id",
                                ("classify",), "the classifier reward")
        labels = list((job.result or {}).get("labels") or [])
        if reward.label not in labels:
            raise ValidationFailed(
                f"label {reward.label!r} is not one of job {job.id}'s labels "
                f"({labels[:20]})", code="unknown_label", field="ppo.reward.label")
    else:
        return
    ckpt = _checkpoint(session, job, reward.checkpoint, "ppo.reward.checkpoint")
    data["ppo"]["reward"]["job_id"] = job.id
    data["ppo"]["reward"]["checkpoint"] = ckpt.id


def resolve_ppo(session: Session, principal: Principal, spec: JobSpec) -> JobSpec:
    """``spec`` checked (module docstring) with its checkpoints named by id and its model and
    tokenizer taken from ``init_from``. Raises :class:`ValidationFailed` (422) naming the
    field at fault."""
    assert spec.task == "ppo" and spec.ppo is not None and spec.init_from is not None
    _refuse_ignored_fields(spec)
    data = spec.model_dump(mode="json")
    _resolve_policy(session, principal, spec, data)
    _check_prompts(session, principal, spec)
    _resolve_reward(session, principal, spec, data)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:  # the checkpoint's model does not fit the rest of the spec
        raise ValidationFailed(f"the spec with init_from's model is not valid: "
                               f"{exc.errors()[0]['msg']}", field="init_from.job_id") from None


def policy_text_stats(session: Session, principal: Principal, spec: JobSpec) -> TextStats:
    """Statistics standing for the policy's training text, for the vocabulary bound of the
    size checks and the dry run: the training text of the language model at the start of the
    ``init_from`` chain or, when its dataset is gone, its tokenizer's exact size as recorded
    in its result."""
    job, root = language_model_root(session, principal, spec)
    stats = training_text_stats(session, principal, root)
    if stats is not None:
        return stats
    vocab = int((job.result or {}).get("vocab_size") or 1)
    return TextStats(vocab, 1, vocab, vocab)


def check_ppo_size(spec: JobSpec, settings: Settings, vocab_size: int) -> None:
    """422 ``job_too_large`` naming ``ppo.rollout_batch_size`` when one iteration's estimated
    memory exceeds the limit of the job's device class: :func:`core.estimate.train_memory` of
    the policy over a batch of ``rollout_batch_size`` sequences of ``response_length`` (plus
    ``prompt_tokens`` with ``from_corpus``) tokens, plus the frozen reference's weights. (The
    policy itself passed the parameter limit when its job was submitted.)"""
    assert spec.ppo is not None
    p = spec.ppo
    prompt = p.prompts.from_corpus.prompt_tokens if p.prompts.from_corpus is not None else 0
    shaped = spec.model_copy(update={"training": spec.training.model_copy(update={
        "batch_size": p.rollout_batch_size, "seq_len": prompt + p.response_length})})
    parts = train_memory(shaped, vocab_size)
    memory = parts.total + parts.weights  # the reference model
    cls = device_class(spec.training.device)
    limits = {"cpu": settings.max_train_memory_bytes_cpu,
              "cuda": settings.max_train_memory_bytes_cuda}
    limit = limits[cls] if cls is not None else min(limits.values())
    if memory > limit:
        raise ValidationFailed(
            f"one PPO iteration needs about {memory:,} bytes (the policy, its reference, "
            f"optimizer state and the activations of {p.rollout_batch_size} sequences of "
            f"{prompt + p.response_length} tokens), more than the {limit:,} this service "
            f"allows on {cls or 'any device (device auto)'}; use a smaller "
            f"rollout_batch_size or response_length", code="job_too_large",
            field="ppo.rollout_batch_size",
            details=[{"train_memory_bytes": memory, "max_train_memory_bytes": limit,
                      "device_class": cls or "auto", "vocab_size_bound": vocab_size}])


def check_ppo_job(session: Session, principal: Principal, spec: JobSpec,
                  settings: Settings | None) -> tuple[JobSpec, dict[str, TextStats]]:
    """:func:`app.jobs.check_job` for a PPO job: :func:`resolve_ppo`, then with ``settings``
    :func:`check_ppo_size`. Returns the spec as it would be stored and ``{"train": ...}``,
    :func:`policy_text_stats` (what the dry run bounds the vocabulary with)."""
    spec = resolve_ppo(session, principal, spec)
    stats = policy_text_stats(session, principal, spec)
    if settings is not None:
        check_ppo_size(spec, settings, vocab_bound(spec, stats).size)
    return spec, {"train": stats}
