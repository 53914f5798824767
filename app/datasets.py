"""Datasets: the API's operations on dataset rows (store an upload, add, get, list, delete).

A dataset is an upload stored under ``datasets/<id>.txt``: a ``text`` dataset (UTF-8 text,
``\n`` line ends only) or a ``labelled`` one (JSON Lines of ``{"text", "label"}``:
``core.labelled``), converted from the upload's files and formats by ``core.ingest`` and
counted on the way (``core.textstats``, ``core.datasetstats``); or, in a job spec, a built-in
corpus (``core.corpora``).

Every lookup takes the :class:`~app.auth.Principal` asking: a dataset of another principal is
not found (404) and is not listed; an admin sees all (``app.auth.owner_filter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.auth import Principal, owner_filter
from core.datasetstats import (
    TokenCounter,
    bpe_estimate,
    char_stats,
    sample_lines,
    word_stats,
)
from core.errors import Conflict, NotFound, ValidationFailed
from core.ingest import IngestOptions, IngestResult, RawFile, ingest
from core.textstats import TextCounter, TextStats
from store.db import newest_first_page
from store.models import Dataset, IdempotencyKey, Job, JobStatus, new_id
from store.storage import Storage


def storage_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.txt"


def new_dataset_id() -> str:
    return new_id("ds")


@dataclass
class StoredUpload:
    """What :func:`store_upload` stored: the blob's size and sha256, the statistics of its
    text (a labelled dataset's: of its examples' texts, each ending a line), the conversion's
    result and the statistics per tokenizer kind."""

    bytes: int
    sha256: str
    text: TextStats
    result: IngestResult
    stats: dict[str, Any]


def store_upload(storage: Storage, key: str, files: list[RawFile], options: IngestOptions,
                 max_bytes: int) -> StoredUpload:
    """Convert ``files`` (``core.ingest``) into the blob at ``key`` and count it. Blocking
    (call it in a thread). Raises ``ValidationFailed`` (422) and ``PayloadTooLarge`` (413,
    ``max_bytes`` of decompressed input); nothing is stored then."""
    counter, tokens = TextCounter(), TokenCounter()

    def observe(text: str) -> None:
        counter.feed_text(text)
        tokens.feed(text)

    with storage.writer(key) as writer:
        result = ingest(files, options, writer, max_bytes, observe)
        # The BPE sample, from the bytes just written (before an object store has them).
        lines = sample_lines(writer.read_back(), writer.bytes,
                             labelled=result.kind == "labelled")
    text = counter.finish()
    stats: dict[str, Any] = {"char": char_stats(text, tokens), "word": word_stats(text, tokens),
                             "bpe": bpe_estimate(lines, text.num_bytes)}
    return StoredUpload(writer.bytes, writer.sha256, text, result, stats)


def add_dataset(
    session: Session, owner: Principal, dataset_id: str, name: str, size: int, sha256: str,
    stats: TextStats, stored: StoredUpload | None = None,
) -> Dataset:
    """Add the row of an uploaded dataset, owned by ``owner`` (flushed, not committed).
    ``stored``: its kind, source format, labels and statistics (a plain text dataset
    without ``stats`` when None)."""
    extra: dict[str, Any] = {}
    if stored is not None:
        r = stored.result
        extra = {"kind": r.kind, "format": r.format, "num_files": r.num_files,
                 "compression": r.compression, "num_examples": r.num_examples,
                 "labels": r.labels, "stats": stored.stats}
    row = Dataset(
        id=dataset_id,
        owner_id=owner.id,
        name=name,
        bytes=size,
        sha256=sha256,
        num_chars=stats.num_chars,
        num_lines=stats.num_lines,
        num_words=stats.num_words,
        storage_key=storage_key(dataset_id),
        **extra,
    )
    session.add(row)
    session.flush()
    return row


def get_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset:
    """The dataset, if ``principal`` may see it; else :class:`NotFound` (the same answer as
    for an id that does not exist)."""
    row = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, owner_filter(principal, Dataset)))
    if row is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return row


def spec_dataset(session: Session, principal: Principal, dataset_id: str,
                 field: str) -> Dataset:
    """The dataset a job spec names in ``field``; :class:`ValidationFailed` (422) naming the
    field when ``principal`` has no such dataset."""
    try:
        return get_dataset(session, principal, dataset_id)
    except NotFound:
        raise ValidationFailed(f"dataset {dataset_id!r} does not exist", field=field) from None


def list_datasets(
    session: Session, principal: Principal, limit: int, after: str | None
) -> tuple[list[Dataset], bool]:
    """The datasets ``principal`` may see, newest first; ``after`` is the id of the last
    dataset of the previous page."""
    return newest_first_page(session, Dataset, limit, after,
                             where=owner_filter(principal, Dataset))


# -- delete -----------------------------------------------------------------------------------

#: The job states in which a job may still read its datasets (a running job, or a queued one:
#: new, or requeued after an interruption).
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def dataset_ids_of(spec: dict[str, Any]) -> set[str]:
    """The uploaded datasets a stored job spec reads: ``dataset``/``dataset_id``,
    ``validation``, ``test`` (a classification job's labelled data too),
    ``model.pretrained_embeddings.dataset_id`` and ``ppo.prompts.dataset_id``."""
    ids: set[str] = set()
    if isinstance(spec.get("dataset_id"), str):
        ids.add(spec["dataset_id"])
    for name in ("dataset", "validation", "test"):
        source = spec.get(name)
        if isinstance(source, dict) and isinstance(source.get("id"), str):
            ids.add(source["id"])
    model = spec.get("model")
    emb = model.get("pretrained_embeddings") if isinstance(model, dict) else None
    if isinstance(emb, dict) and isinstance(emb.get("dataset_id"), str):
        ids.add(emb["dataset_id"])
    ppo = spec.get("ppo")  # a PPO job's prompts (app.ppo)
    prompts = ppo.get("prompts") if isinstance(ppo, dict) else None
    if isinstance(prompts, dict) and isinstance(prompts.get("dataset_id"), str):
        ids.add(prompts["dataset_id"])
    return ids


def active_jobs_using(session: Session, dataset_id: str) -> list[Job]:
    """The queued and running jobs (of any principal) whose spec reads ``dataset_id``."""
    rows = session.scalars(select(Job).where(Job.status.in_(ACTIVE))
                           .order_by(Job.created_at, Job.id))
    return [job for job in rows if dataset_id in dataset_ids_of(job.spec)]


def delete_dataset(session: Session, storage: Storage, principal: Principal,
                   dataset_id: str) -> None:
    """Delete the dataset (its row, its Idempotency-Key records, then its blob) and commit.

    404 (:class:`NotFound`) when ``principal`` may not see it; 409 ``dataset_in_use``
    (:class:`Conflict`, nothing deleted) while a queued or running job reads it, naming the
    jobs ``principal`` may see (and counting the others).

    The race with a job submitted meanwhile: the row's DELETE comes first, so this
    transaction holds the row's lock (PostgreSQL) or the database's write lock (SQLite) while
    it looks for jobs; ``app.jobs.create_job`` reads its datasets again after inserting the
    job, in its own transaction. Whichever commits second sees the other: a submission that
    inserted its job first makes this a 409; a delete that committed first makes the
    submission a 422 ("does not exist"). A job that still found its dataset gone (one created
    by a path that skips those checks) fails at claim time with ``dataset_error`` ("dataset
    ... is missing from storage")."""
    row = get_dataset(session, principal, dataset_id)
    key = row.storage_key
    session.execute(delete(Dataset).where(Dataset.id == dataset_id)
                    .execution_options(synchronize_session=False))
    users = active_jobs_using(session, dataset_id)
    if users:
        session.rollback()
        visible = [j.id for j in users
                   if principal.is_admin or j.owner_id == principal.id]
        others = len(users) - len(visible)
        parts = [", ".join(visible[:20]) + (", ..." if len(visible) > 20 else "")] \
            if visible else []
        if others:
            parts.append(f"{others} job(s) of other principals")
        raise Conflict(f"dataset {dataset_id} is used by queued or running job(s): "
                       f"{' and '.join(parts)}; cancel them or wait for them to finish",
                       code="dataset_in_use",
                       details=[{"job_ids": visible, "other_jobs": others}])
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.resource_id == dataset_id)
                    .execution_options(synchronize_session=False))
    session.commit()
    storage.delete(key)  # after the commit: a failed commit leaves the dataset whole
