"""``/v1/keys``: API key management, for admin keys only (403 ``forbidden`` for others: the
route's existence is no secret, only the keys are).

``POST`` creates a key and returns it once (``key``); ``GET`` lists keys by their visible
prefix (never the key or its hash); ``DELETE /v1/keys/{prefix}`` revokes one (the next request
with it is a 401). ``lmforge keys create|list|revoke`` do the same on the database directly.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.auth import AdminDep
from app.deps import SessionDep
from app.http_errors import ErrorBody
from store import apikeys

router = APIRouter(prefix="/keys", tags=["keys"],
                   responses={403: {"model": ErrorBody, "description": "not an admin key"}})


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=apikeys.NAME_PATTERN, max_length=40,
                      description="the principal the key acts for; keys with the same name "
                                  "share datasets and jobs")
    is_admin: bool = Field(default=False, strict=True)  # true/false only, not 0/1 or "yes"


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    prefix: str = Field(description="the key's first 12 characters; revoke it by this")
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown this once, never stored")


class KeyList(BaseModel):
    data: list[KeyOut]


@router.post("", status_code=201, response_model=KeyCreated,
             responses={422: {"model": ErrorBody, "description": "an invalid name"}})
def create_key(body: KeyCreate, session: SessionDep, _: AdminDep) -> KeyCreated:
    """A new key for principal ``name``; the answer is the only time ``key`` is shown."""
    created = apikeys.create_key(session, body.name, is_admin=body.is_admin)
    session.commit()
    out = KeyOut.model_validate(created.row)
    return KeyCreated(**out.model_dump(), key=created.key)


@router.get("", response_model=KeyList)
def list_keys(session: SessionDep, _: AdminDep) -> KeyList:
    """Every key, revoked ones included, oldest first."""
    return KeyList(data=[KeyOut.model_validate(r) for r in apikeys.list_keys(session)])


@router.delete("/{prefix}", response_model=KeyOut,
               responses={404: {"model": ErrorBody, "description": "no key has this prefix"}})
def revoke_key(prefix: str, session: SessionDep, _: AdminDep) -> KeyOut:
    """Revoke the key with this prefix (again: no change); requests with it then get 401."""
    row = apikeys.revoke_key(session, prefix)
    session.commit()
    return KeyOut.model_validate(row)
