"""Datasets: the API's operations on dataset rows (add, get, list).

A dataset is an uploaded UTF-8 text file (stored under ``datasets/<id>.txt``) whose statistics
(``core.textstats``) were counted while it streamed in, or, in a job spec, a built-in corpus
(``core.corpora``).

Every lookup takes the :class:`~app.auth.Principal` asking: a dataset of another principal is
not found (404) and is not listed; an admin sees all (``app.auth.owner_filter``).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal, owner_filter
from core.errors import NotFound
from core.textstats import TextStats
from store.db import newest_first_page
from store.models import Dataset, new_id


def storage_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.txt"


def new_dataset_id() -> str:
    return new_id("ds")


def add_dataset(
    session: Session, owner: Principal, dataset_id: str, name: str, size: int, sha256: str,
    stats: TextStats,
) -> Dataset:
    """Add the row of an uploaded dataset, owned by ``owner`` (flushed, not committed)."""
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


def list_datasets(
    session: Session, principal: Principal, limit: int, after: str | None
) -> tuple[list[Dataset], bool]:
    """The datasets ``principal`` may see, newest first; ``after`` is the id of the last
    dataset of the previous page."""
    return newest_first_page(session, Dataset, limit, after,
                             where=owner_filter(principal, Dataset))
