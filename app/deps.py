"""FastAPI dependencies, declared once as ``Annotated`` aliases.

The resources live on ``app.state`` (built by ``app.main``'s lifespan); tests replace any of
them with ``app.dependency_overrides[get_enqueuer] = ...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.idempotency import HEADER, KEY_MAX_CHARS, KEY_PATTERN
from store.queue import Enqueuer
from store.settings import Settings
from store.storage import Storage


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; routes commit explicitly, anything uncommitted rolls back."""
    with request.app.state.session_factory() as session:
        yield session


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_enqueuer(request: Request) -> Enqueuer:
    enqueuer: Enqueuer = request.app.state.enqueuer
    return enqueuer


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EnqueuerDep = Annotated[Enqueuer, Depends(get_enqueuer)]
# The optional Idempotency-Key request header (app.idempotency); 422 naming it when it is
# empty, longer than 255 characters or not printable ASCII.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER, min_length=1, max_length=KEY_MAX_CHARS, pattern=KEY_PATTERN,
        description="Makes the request safe to retry: a retry with the same key and the same "
                    "request within LMFORGE_IDEMPOTENCY_TTL_S (24 h) returns the original "
                    "resource (200); the same key with another request is 409. 1-255 "
                    "printable ASCII characters.",
    ),
]
