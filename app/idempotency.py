"""``Idempotency-Key``: a retried creating request returns what the first one created.

A client sends ``Idempotency-Key: <1-255 printable ASCII characters>`` with ``POST /v1/jobs``
or ``POST /v1/datasets``. The key is stored in ``idempotency_keys`` (primary key: scope and
key) with the sha256 of the request and the id of the resource, in the same transaction as
the resource. So:

- a retry with the same key and the same request finds the row and returns that resource
  (200, header ``Idempotent-Replayed: true``);
- the same key with another request is a :class:`Conflict` (409, ``idempotency_key_reused``);
- requests racing with one key: each inserts its resource and the key; the primary key lets
  one commit, the others fail with ``IntegrityError``, roll back (their resource with them)
  and return the winner's;
- a key is remembered for ``LMFORGE_IDEMPOTENCY_TTL_S`` seconds (24 h) from its first use;
  after that it is ignored, and the same key creates a new resource. Expired rows are deleted
  when their key is used again and, at most once a minute per API process, all at once.

"The same request" is compared by :func:`request_digest` of what defines the resource: the
job spec as validated (so key order and spelled-out defaults do not matter), or the dataset's
name, file name and content sha256.

Keys are per principal (:func:`principal_scope`). Helpers take the caller's session and never
commit, except :func:`purge_expired`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from core.errors import Conflict
from store.models import IdempotencyKey, utcnow

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
# Printable ASCII, spaces included (HTTP strips them at the ends): what the header may hold.
KEY_PATTERN = r"^[\x20-\x7e]+$"
KEY_MAX_CHARS = 255
# How often one API process deletes every expired key (seconds).
PURGE_INTERVAL_S = 60.0

_purge_lock = threading.Lock()
_last_purge = -PURGE_INTERVAL_S


def request_digest(payload: Any) -> str:
    """The sha256 (hex) of ``payload`` as canonical JSON (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def principal_scope(scope: str, principal_id: str) -> str:
    """The scope of ``principal_id``'s keys for ``scope`` (``jobs`` or ``datasets``): each
    principal has its own keys, so one principal's key never finds (or blocks) another's
    resource. ``<scope>/<first 20 hex of sha256(principal_id)>``, within the column's 32
    characters."""
    return f"{scope}/{hashlib.sha256(principal_id.encode()).hexdigest()[:20]}"


def find(session: Session, scope: str, key: str, digest: str, ttl_s: float) -> str | None:
    """The id of the resource that ``key`` created in ``scope`` (``jobs``, ``datasets``)
    within the last ``ttl_s`` seconds, or None when the key is new or expired.

    Raises :class:`Conflict` (``idempotency_key_reused``, field ``Idempotency-Key``) when the
    key was used with a request whose digest is not ``digest``."""
    row = session.get(IdempotencyKey, (scope, key), populate_existing=True)
    if row is None or row.created_at < utcnow() - timedelta(seconds=ttl_s):
        return None
    if row.request_sha256 != digest:
        raise Conflict(
            f"this {HEADER} was used with a different request (within the last "
            f"{ttl_s / 3600:g} h); send a new key for a new request",
            code="idempotency_key_reused", field=HEADER,
            details=[{"resource_id": row.resource_id}],
        )
    return row.resource_id


def remember(
    session: Session, scope: str, key: str, digest: str, resource_id: str, ttl_s: float
) -> None:
    """Store ``key`` for ``resource_id`` (flushed, not committed): call it in the transaction
    that adds the resource. An expired row of the same key is deleted first. Raises
    ``IntegrityError`` when a concurrent request stored the key first (roll back and
    :func:`find` the winner)."""
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    session.execute(
        delete(IdempotencyKey)
        .where(IdempotencyKey.scope == scope, IdempotencyKey.key == key,
               IdempotencyKey.created_at < cutoff)
        .execution_options(synchronize_session=False)
    )
    session.add(IdempotencyKey(scope=scope, key=key, request_sha256=digest,
                               resource_id=resource_id))
    session.flush()


def winner(session: Session, scope: str, key: str | None, digest: str,
           ttl_s: float) -> str:
    """After the commit that adds a resource failed with ``IntegrityError``: roll back and
    return the id of the resource a concurrent request with the same ``key`` created first.
    Re-raises that ``IntegrityError`` (call it in the ``except`` block) when there is no key,
    or no such resource: then the error was another one."""
    session.rollback()
    found = find(session, scope, key, digest, ttl_s) if key is not None else None
    if found is None:
        raise  # the IntegrityError being handled by the caller
    return found


def purge_expired(session: Session, ttl_s: float) -> int | None:
    """Delete every key older than ``ttl_s`` seconds and commit (call it with nothing else
    pending), unless this process did so less than :data:`PURGE_INTERVAL_S` ago (then None).
    Best effort: a failure is rolled back and logged, never raised. Returns the number of
    rows deleted."""
    global _last_purge
    with _purge_lock:
        now = time.monotonic()
        if now - _last_purge < PURGE_INTERVAL_S:
            return None
        _last_purge = now
    try:
        result = session.execute(
            delete(IdempotencyKey)
            .where(IdempotencyKey.created_at < utcnow() - timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False)
        )
        session.commit()
        deleted = int(result.rowcount)  # type: ignore[attr-defined]
    except Exception:
        session.rollback()
        log.warning("could not purge expired idempotency keys", exc_info=True)
        return None
    if deleted:
        log.info("purged %d expired idempotency keys", deleted)
    return deleted
