"""Jobs: the status machine and the domain operations of the API.

:func:`transition` is the one function that changes a job's status. It is a compare-and-set
(``UPDATE jobs ... WHERE id = :id AND status IN (allowed sources)``) checked against
:data:`ALLOWED_TRANSITIONS`, so two processes racing on one job cannot both win, and an illegal
move is a :class:`Conflict` (409), never a silent overwrite. The runner's side (claim, metrics,
checkpoints, finish, orphan sweep) is in :mod:`app.progress`.

Helpers take the caller's session and never commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from app.datasets import TextStats, builtin_stats, get_dataset
from app.db import newest_first_page
from app.errors import Conflict, NotFound, ValidationFailed
from app.models import Checkpoint, CheckpointKind, Dataset, Job, JobStatus, Metric, new_id, utcnow
from worker.engine.splits import split_bounds, tokens_needed
from worker.spec import DatasetSource, JobSpec

log = logging.getLogger(__name__)

S = JobStatus
TERMINAL_STATES: frozenset[JobStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # failed: the enqueue after the commit failed (enqueue_failed).
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    # queued: the orphan sweep hands a job whose worker died back to the queue, and a worker
    # that is shutting down hands back the job it was running (app.progress.requeue_interrupted).
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    **{s: frozenset() for s in TERMINAL_STATES},
}


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    expect: Iterable[JobStatus] | None = None,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> None:
    """Move job ``job_id`` to status ``to`` and set ``values`` in the same UPDATE.

    Allowed only from the states of :data:`ALLOWED_TRANSITIONS` that lead to ``to`` (narrowed
    to ``expect`` when given, and to rows matching ``where``). Sets ``started_at`` on entering
    running and ``finished_at`` on entering a terminal state. Raises :class:`NotFound` for an
    unknown job and :class:`Conflict` when the job is in another state."""
    sources = {s for s, targets in ALLOWED_TRANSITIONS.items() if to in targets}
    if expect is not None:
        sources &= set(expect)
    now = utcnow()
    if to == S.RUNNING:
        values.setdefault("started_at", now)
    if to in TERMINAL_STATES:
        values.setdefault("finished_at", now)
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sources), *where)
        .values(status=to, **values)
        .execution_options(synchronize_session="fetch")
    )
    if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
        return
    current = session.scalar(select(Job.status).where(Job.id == job_id))
    if current is None:
        raise NotFound(f"job {job_id!r} not found")
    raise Conflict(
        f"job {job_id} is {current.value}; it cannot become {to.value}",
        code="invalid_transition",
        details=[{"status": current.value, "requested": to.value}],
    )


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(session: Session, limit: int, after: str | None) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page (a keyset cursor
    over ``(created_at, id)``, stable while new jobs arrive)."""
    return newest_first_page(session, Job, limit, after)


# -- creation ---------------------------------------------------------------------------------


def _source_stats(session: Session, source: DatasetSource, field: str) -> TextStats:
    if source.path is not None:
        raise ValidationFailed(
            "'path' sources are for `lmforge train` only; upload the file with "
            "POST /v1/datasets and give its id",
            field=field.rsplit(".", 1)[0] + ".path" if "." in field else "path",
        )
    if source.builtin is not None:
        return builtin_stats(source.builtin)
    assert source.id is not None
    try:
        d = get_dataset(session, source.id)
    except NotFound:
        raise ValidationFailed(f"dataset {source.id!r} does not exist", field=field) from None
    return TextStats(d.num_chars, d.num_lines, d.num_words, d.bytes)


def _split_tokens(spec: JobSpec, stats: dict[str, TextStats]) -> dict[str, int]:
    """Tokens per split, cut by the engine's own :func:`split_bounds`: about that many for
    ``char``/``word`` (the cut is applied to the token count); an upper bound for ``bpe``
    (the cut is applied to characters, then :meth:`TextStats.bpe_token_bound`)."""
    kind = spec.tokenizer.kind
    bpe = kind == "bpe"
    train = stats["train"]
    n = train.num_chars if bpe else (train.tokens(kind) or 0)
    train_end, test_start = split_bounds(spec, n, separate_validation="validation" in stats,
                                         separate_test="test" in stats)
    held_out = {"validation": test_start - train_end, "test": n - test_start}
    fractions = {"validation": spec.val_fraction, "test": spec.test_fraction}
    splits = {"train": train.bpe_token_bound(train_end) if bpe else train_end}
    for name in ("validation", "test"):
        if name in stats:
            other = stats[name]
            splits[name] = (other.bpe_token_bound(other.num_chars) if bpe
                            else other.tokens(kind) or 0)
        elif fractions[name] > 0:
            splits[name] = train.bpe_token_bound(held_out[name]) if bpe else held_out[name]
    return splits


def _check_corpus_size(spec: JobSpec, stats: dict[str, TextStats]) -> None:
    """422 unless each split holds enough tokens: train one batch of batch_size x
    (seq_len + 1), validation/test at least 2. For ``bpe`` the counts are upper bounds (its
    vocabulary is not trained yet): a bound that suffices proves nothing, and the worker checks
    the real counts (``corpus_too_small``)."""
    kind = spec.tokenizer.kind
    splits = _split_tokens(spec, stats)
    bound = kind == "bpe"
    about = "at most" if bound else "about"
    why = " (byte-level BPE makes at most one token per UTF-8 byte)" if bound else ""
    b, t = spec.training.batch_size, spec.training.seq_len
    need = tokens_needed(spec)
    for name, have in splits.items():
        if have >= need[name]:
            continue
        if name == "train":
            msg = (f"the training split has {about} {have} {kind} tokens{why} but one batch "
                   f"needs batch_size x (seq_len + 1) = {b} x {t + 1} = {need[name]}; use more "
                   f"text or a smaller batch_size or seq_len")
            field = "training.batch_size"
        else:
            msg = (f"the {name} split has {about} {have} tokens{why} but evaluation needs at "
                   f"least {need[name]}")
            field = name if name in stats else ("val_fraction" if name == "validation"
                                                else "test_fraction")
        raise ValidationFailed(
            msg, code="corpus_too_small", field=field,
            details=[{"split": name, "tokens": have, "needed": need[name],
                      "batch_size": b, "seq_len": t}],
        )


def validate_sources(session: Session, spec: JobSpec) -> None:
    """Check what the spec alone cannot: datasets exist, no server-side paths, enough text."""
    assert spec.dataset is not None
    stats: dict[str, TextStats] = {
        "train": _source_stats(
            session, spec.dataset, "dataset_id" if spec.dataset_id else "dataset.id"
        )
    }
    for name in ("validation", "test"):
        source = getattr(spec, name)
        if source is not None:
            stats[name] = _source_stats(session, source, f"{name}.id")
    emb = spec.model.pretrained_embeddings
    if emb is not None:
        field = "model.pretrained_embeddings.dataset_id"
        if emb.path is not None:
            raise ValidationFailed("'path' embeddings are for `lmforge train` only; upload "
                                   "the file and give its dataset_id",
                                   field="model.pretrained_embeddings.path")
        assert emb.dataset_id is not None
        if session.get(Dataset, emb.dataset_id) is None:
            raise ValidationFailed(f"dataset {emb.dataset_id!r} does not exist", field=field)
    _check_corpus_size(spec, stats)


def create_job(session: Session, spec: JobSpec) -> Job:
    """Validate ``spec`` against the stored datasets and add a queued job (not committed)."""
    validate_sources(session, spec)
    job = Job(
        id=new_id("job"),
        name=spec.name,
        status=S.QUEUED,
        spec=spec.model_dump(mode="json"),
        progress={"step": 0, "total_steps": spec.training.max_steps, "tokens_seen": 0},
    )
    session.add(job)
    session.flush()
    return job


# -- cancel and enqueue failure ---------------------------------------------------------------


def cancel_job(session: Session, job_id: str) -> Job:
    """A queued job is cancelled at once. A running one gets ``cancel_requested``: its runner
    stops at the next metrics flush, saves a ``last`` checkpoint and ends ``cancelled``.
    A finished job is a :class:`Conflict`."""
    job = get_job(session, job_id)
    if job.status == S.QUEUED:
        try:
            transition(session, job_id, S.CANCELLED, expect=[S.QUEUED], cancel_requested=True)
            return get_job(session, job_id)
        except Conflict:
            job = get_job(session, job_id)  # claimed meanwhile: cancel it as a running job
    if job.status == S.RUNNING:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == S.RUNNING)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
        return get_job(session, job_id)
    raise Conflict(
        f"job {job_id} is already {job.status.value}", code="job_finished",
        details=[{"status": job.status.value}],
    )


def mark_enqueue_failed(session: Session, job_id: str, reason: str) -> None:
    """The job was committed but its message never reached the broker: fail it (rather than
    leave it queued forever) so the caller can see why and resubmit."""
    transition(
        session, job_id, S.FAILED, expect=[S.QUEUED],
        error={"code": "enqueue_failed",
               "message": f"the job could not be queued (broker unreachable: {reason}); "
                          f"submit it again when the broker is back"},
    )


# -- reads ------------------------------------------------------------------------------------


def list_metrics(
    session: Session, job_id: str, after_step: int, limit: int
) -> tuple[list[Metric], bool]:
    get_job(session, job_id)
    rows = list(
        session.scalars(
            select(Metric)
            .where(Metric.job_id == job_id, Metric.step > after_step)
            .order_by(Metric.step)
            .limit(limit + 1)
        )
    )
    return rows[:limit], len(rows) > limit


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    get_job(session, job_id)
    return list(
        session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        )
    )


def get_checkpoint(session: Session, job_id: str, checkpoint_id: str) -> Checkpoint:
    get_job(session, job_id)
    ckpt = session.get(Checkpoint, checkpoint_id)
    if ckpt is None or ckpt.job_id != job_id:
        raise NotFound(f"checkpoint {checkpoint_id!r} of job {job_id} not found")
    return ckpt


def job_result(session: Session, job_id: str) -> dict[str, Any]:
    """The outcome of a finished job; :class:`Conflict` while it is queued or running."""
    job = get_job(session, job_id)
    if job.status not in TERMINAL_STATES:
        raise Conflict(f"job {job_id} is {job.status.value}; its result is not ready",
                       code="job_not_finished", details=[{"status": job.status.value}])
    ids = {
        kind: session.scalar(
            select(Checkpoint.id)
            .where(Checkpoint.job_id == job_id, Checkpoint.kind == kind)
            .order_by(Checkpoint.step.desc())
            .limit(1)
        )
        for kind in (CheckpointKind.BEST, CheckpointKind.LAST)
    }
    out: dict[str, Any] = dict(job.result or {})
    if job.status == S.CANCELLED and not out:
        out["stop_reason"] = "cancelled"
    out.update(
        job_id=job.id,
        status=job.status.value,
        best_checkpoint_id=ids[CheckpointKind.BEST],
        last_checkpoint_id=ids[CheckpointKind.LAST],
        error=job.error,
    )
    out.setdefault("tokens_seen", job.progress.get("tokens_seen"))
    return out
