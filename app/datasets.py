"""Datasets: the API's operations on dataset rows (add, get, list).

A dataset is an uploaded UTF-8 text file (stored under ``datasets/<id>.txt``) whose statistics
(``core.textstats``) were counted while it streamed in, or, in a job spec, a built-in corpus
(``core.corpora``).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.errors import NotFound
from core.textstats import TextStats
from store.db import newest_first_page
from store.models import Dataset, new_id


def storage_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.txt"


def new_dataset_id() -> str:
    return new_id("ds")


def add_dataset(
    session: Session, dataset_id: str, name: str, size: int, sha256: str, stats: TextStats
) -> Dataset:
    row = Dataset(
        id=dataset_id,
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


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return row


def list_datasets(
    session: Session, limit: int, after: str | None
) -> tuple[list[Dataset], bool]:
    """Newest first; ``after`` is the id of the last dataset of the previous page."""
    return newest_first_page(session, Dataset, limit, after)
