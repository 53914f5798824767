"""Jobs: the API's domain operations (create with the submission checks, cancel, reads).

Status changes go through :func:`store.status.transition`, the one function that changes a
job's status; the runner's side (claim, metrics, checkpoints, finish, orphan sweep) is in
:mod:`store.progress`.

Helpers take the caller's session and never commit. Every lookup takes the
:class:`~app.auth.Principal` asking, as a required argument: a job of another principal (and
its metrics, result and checkpoints) is not found (404) and never listed; an admin sees all
(``app.auth.owner_filter``, the one ownership rule).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app import classify, notify, ppo, quotas
from app.auth import Principal, owner_filter
from app.datasets import dataset_ids_of, get_dataset, spec_dataset
from core.errors import Conflict, NotFound, ValidationFailed
from core.estimate import VocabBound, vocab_bound
from core.spec import DatasetSource, JobSpec
from core.splits import corpus_shortfall, estimate_split_tokens
from core.textstats import TextStats, builtin_stats
from store.db import newest_first_page
from store.models import (
    Checkpoint,
    CheckpointKind,
    Dataset,
    Job,
    JobAttempt,
    JobStatus,
    Metric,
    new_id,
    utcnow,
)
from store.settings import Settings, get_settings
from store.status import TERMINAL_STATES, transition

log = logging.getLogger(__name__)

S = JobStatus


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job (freshly read), if ``principal`` may see it; else :class:`NotFound` (the same
    answer as for an id that does not exist)."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, owner_filter(principal, Job))
        .execution_options(populate_existing=True))
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(
    session: Session, principal: Principal, limit: int, after: str | None,
    status: JobStatus | None = None,
) -> tuple[list[Job], bool]:
    """The jobs ``principal`` may see, newest first; ``after`` is the id of the last job of
    the previous page (a keyset cursor over ``(created_at, id)``, stable while new jobs
    arrive). ``status``: only jobs in that status; the cursor's job is found whatever its
    status now (it may have finished since the previous page), and is never listed again."""
    where = owner_filter(principal, Job)
    if status is not None:
        wanted = Job.status == status
        where = and_(where, or_(wanted, Job.id == after) if after is not None else wanted)
    return newest_first_page(session, Job, limit, after, where=where)


# -- creation ---------------------------------------------------------------------------------


def _source_stats(
    session: Session, principal: Principal, source: DatasetSource, field: str
) -> TextStats:
    if source.path is not None:
        raise ValidationFailed(
            "'path' sources are for `lmforge train` only; upload the file with "
            "POST /v1/datasets and give its id",
            field=field.rsplit(".", 1)[0] + ".path" if "." in field else "path",
        )
    if source.builtin is not None:
        return builtin_stats(source.builtin)
    assert source.id is not None
    d = spec_dataset(session, principal, source.id, field)
    return TextStats(d.num_chars, d.num_lines, d.num_words, d.bytes)


def _text_datasets_only(session: Session, principal: Principal, spec: JobSpec) -> None:
    """422 ``dataset_not_text`` for a language-model job whose data is a labelled dataset (its
    stored file is ``{"text", "label"}`` JSON Lines, not text: docs/datasets.md)."""
    assert spec.dataset is not None
    for field, source in (("dataset_id" if spec.dataset_id else "dataset.id", spec.dataset),
                          ("validation.id", spec.validation), ("test.id", spec.test)):
        if source is None or source.id is None:
            continue
        row = get_dataset(session, principal, source.id)  # exists: _source_stats checked it
        if row.kind == "labelled":
            raise ValidationFailed(
                f"dataset {source.id!r} is a labelled dataset ({row.num_examples} examples of "
                "text and label); a language model trains on a text dataset: upload the texts "
                "without label_field (e.g. format=jsonl&text_field=text), or use task "
                "'classify'", code="dataset_not_text", field=field)


def _check_corpus_size(spec: JobSpec, stats: dict[str, TextStats]) -> None:
    """422 ``corpus_too_small`` unless each split holds enough tokens (:mod:`core.splits`
    owns the arithmetic and the message). For ``bpe`` the counts are upper bounds (its
    vocabulary is not trained yet), and the worker checks the real counts."""
    shortfall = corpus_shortfall(
        spec, estimate_split_tokens(spec, stats),
        accuracy="at most" if spec.tokenizer.kind == "bpe" else "about",
        separate=frozenset(stats) - {"train"},
    )
    if shortfall is not None:
        raise ValidationFailed(shortfall.message, code="corpus_too_small",
                               field=shortfall.field, details=[shortfall.details(spec)])


def validate_sources(session: Session, principal: Principal,
                     spec: JobSpec) -> dict[str, TextStats]:
    """Check what the spec alone cannot: datasets exist and are ``principal``'s (another
    principal's dataset "does not exist"), no server-side paths, enough text. Returns the
    text statistics of the splits' datasets (``train``, and ``validation``/``test`` when
    separate)."""
    assert spec.dataset is not None
    stats: dict[str, TextStats] = {
        "train": _source_stats(
            session, principal, spec.dataset, "dataset_id" if spec.dataset_id else "dataset.id"
        )
    }
    for name in ("validation", "test"):
        source = getattr(spec, name)
        if source is not None:
            stats[name] = _source_stats(session, principal, source, f"{name}.id")
    emb = spec.model.pretrained_embeddings
    if emb is not None:
        field = "model.pretrained_embeddings.dataset_id"
        if emb.path is not None:
            raise ValidationFailed("'path' embeddings are for `lmforge train` only; upload "
                                   "the file and give its dataset_id",
                                   field="model.pretrained_embeddings.path")
        assert emb.dataset_id is not None
        spec_dataset(session, principal, emb.dataset_id, field)
    if spec.task == "classify":
        classify.check_labelled_sources(session, principal, spec)  # examples, not tokens
    else:
        _text_datasets_only(session, principal, spec)
        _check_corpus_size(spec, stats)
    return stats


def size_basis(session: Session, principal: Principal, spec: JobSpec,
               train: TextStats) -> tuple[VocabBound, int | None]:
    """The vocabulary a job's size is counted with and a classify job's number of labels
    (None for a language model). The vocabulary: ``init_from``'s (the checkpoint's tokenizer
    is the job's; its job's ``result.vocab_size``), else :func:`core.estimate.vocab_bound`
    with the training dataset's exact statistics (``datasets.stats``; null for older rows:
    the bound from ``train`` alone). The labels: the training dataset's ``labels``."""
    row = None
    assert spec.dataset is not None
    if spec.dataset.id is not None:
        try:
            row = get_dataset(session, principal, spec.dataset.id)
        except NotFound:
            row = None
    num_labels = None
    if spec.task == "classify":
        num_labels = len((row.labels if row is not None else None) or {}) or 2
    init = spec.init_from
    if init is not None:
        try:
            source = get_job(session, principal, init.job_id)
            vocab = int((source.result or {}).get("vocab_size") or 0)
        except NotFound:
            vocab = 0
        if vocab > 0:
            return VocabBound(vocab, "init_from's checkpoint's vocabulary"), num_labels
    exact = getattr(row, "stats", None)
    return vocab_bound(spec, train, exact if isinstance(exact, dict) else None), num_labels


def check_job(session: Session, principal: Principal, spec: JobSpec,
              settings: Settings | None) -> tuple[JobSpec, dict[str, TextStats]]:
    """The submission's checks but the quotas (:func:`validate_sources`, ``init_from``, and
    with ``settings`` the job's size, :func:`app.quotas.check_job_size`): the spec as it would
    be stored and its datasets' statistics. Used by :func:`create_job` and the dry run
    (:mod:`app.estimate`). A PPO job: :func:`app.ppo.check_ppo_job`."""
    if spec.task == "ppo":
        return ppo.check_ppo_job(session, principal, spec, settings)
    stats = validate_sources(session, principal, spec)
    spec = classify.resolve_init_from(session, principal, spec)
    if settings is not None:
        bound, num_labels = size_basis(session, principal, spec, stats["train"])
        quotas.check_job_size(spec, settings, stats["train"],
                              estimate_split_tokens(spec, stats).get("validation"),
                              bound, num_labels)
    return spec, stats


def create_job(
    session: Session, principal: Principal, spec: JobSpec, *, enqueue: bool = False,
    settings: Settings | None = None,
) -> Job:
    """Validate ``spec`` against the datasets ``principal`` may see and add a queued job
    owned by ``principal`` (not committed).
    ``enqueue``: the caller hands it to the broker right after the commit, so its
    ``enqueued_at`` is set to its ``created_at`` (else NULL: not handed over yet).
    ``settings``: also apply the service's limits (:mod:`app.quotas`: the job's size, 422
    ``job_too_large``/``eval_too_large``; the principal's job quotas, 429 ``quota_exceeded``)."""
    spec, _ = check_job(session, principal, spec, settings)
    notify.check_outbound_urls(spec, settings or get_settings())  # webhook, MLflow URLs
    if settings is not None:
        quotas.check_job_quota(session, principal, settings)
    now = utcnow()
    job = Job(
        id=new_id("job"),
        owner_id=principal.id,
        name=spec.name,
        status=S.QUEUED,
        created_at=now,
        enqueued_at=now if enqueue else None,
        spec=spec.model_dump(mode="json"),
        progress={"step": 0, "total_steps": spec.training.max_steps, "tokens_seen": 0},
    )
    session.add(job)
    session.flush()
    notify.add_delivery(session, job, spec)  # its webhook's row, when it has one
    _datasets_still_there(session, job)
    return job


def _datasets_still_there(session: Session, job: Job) -> None:
    """Read the job's datasets again after its row is written, in the same transaction, so a
    ``DELETE /v1/datasets/{id}`` racing this submission is seen by one side
    (``app.datasets.delete_dataset``): ``FOR SHARE`` waits for a delete holding the row's lock
    (PostgreSQL); on SQLite the job's INSERT already holds the database's write lock, so this
    read sees every committed delete. A dataset gone is a 422 and the job is not created."""
    ids = sorted(dataset_ids_of(job.spec))
    if not ids:
        return
    found = set(session.scalars(select(Dataset.id).where(Dataset.id.in_(ids))
                                .with_for_update(read=True)))
    for dataset_id in ids:
        if dataset_id not in found:
            raise ValidationFailed(f"dataset {dataset_id!r} does not exist (it was deleted "
                                   "while the job was submitted)", field="dataset_id")


# -- cancel and enqueue failure ---------------------------------------------------------------


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A queued job is cancelled at once. A running one gets ``cancel_requested``: its runner
    notices it within about one heartbeat interval plus one step (or one evaluation batch),
    saves a ``last`` checkpoint and ends ``cancelled``; one that finishes training meanwhile
    ends ``cancelled`` too (``store.progress.finish_job`` only succeeds a job whose cancel was
    not requested). So an accepted cancel is a promise: the job ends ``cancelled``.

    A finished job is a :class:`Conflict` (``job_finished``), including one that finished
    between the read and the conditional update (the update then matched no running row)."""
    for _ in range(3):  # a job may move queued -> running -> queued (requeued) meanwhile
        job = get_job(session, principal, job_id)
        if job.status == S.QUEUED:
            try:
                transition(session, job_id, S.CANCELLED, expect=[S.QUEUED],
                           cancel_requested=True)
                return get_job(session, principal, job_id)
            except Conflict:
                continue  # claimed meanwhile: cancel it as a running job
        if job.status == S.RUNNING:
            res = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == S.RUNNING)
                .values(cancel_requested=True)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return get_job(session, principal, job_id)
            continue  # it finished (or went back to the queue) meanwhile: look again
        break
    job = get_job(session, principal, job_id)
    raise Conflict(
        f"job {job_id} is already {job.status.value}", code="job_finished",
        details=[{"status": job.status.value}],
    )


# -- reads ------------------------------------------------------------------------------------


def attempt_histories(session: Session, job_ids: list[str]) -> dict[str, list[JobAttempt]]:
    """The ``job_attempts`` rows of each of ``job_ids``, ordered by attempt (one query; a job
    with no attempt yet maps to an empty list)."""
    out: dict[str, list[JobAttempt]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return out
    rows = session.scalars(
        select(JobAttempt)
        .where(JobAttempt.job_id.in_(job_ids))
        .order_by(JobAttempt.job_id, JobAttempt.attempt)
        .execution_options(populate_existing=True)
    )
    for row in rows:
        out[row.job_id].append(row)
    return out



def list_metrics(
    session: Session, principal: Principal, job_id: str, after_step: int, limit: int
) -> tuple[list[Metric], bool]:
    get_job(session, principal, job_id)
    rows = list(
        session.scalars(
            select(Metric)
            .where(Metric.job_id == job_id, Metric.step > after_step)
            .order_by(Metric.step)
            .limit(limit + 1)
        )
    )
    return rows[:limit], len(rows) > limit


def list_checkpoints(session: Session, principal: Principal, job_id: str) -> list[Checkpoint]:
    get_job(session, principal, job_id)
    return list(
        session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        )
    )


def get_checkpoint(
    session: Session, principal: Principal, job_id: str, checkpoint_id: str
) -> Checkpoint:
    get_job(session, principal, job_id)
    ckpt = session.get(Checkpoint, checkpoint_id)
    if ckpt is None or ckpt.job_id != job_id:
        raise NotFound(f"checkpoint {checkpoint_id!r} of job {job_id} not found")
    return ckpt


def job_result(session: Session, principal: Principal, job_id: str) -> dict[str, Any]:
    """The outcome of a finished job; :class:`Conflict` while it is queued or running."""
    job = get_job(session, principal, job_id)
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
