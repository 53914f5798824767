"""API keys: create, verify, list and revoke (no web framework; the API, ``lmforge keys`` and
``lmforge up`` share it).

A key is ``lmf_`` followed by 40 random base-62 characters (about 238 bits from
:mod:`secrets`): the fixed ``lmf_`` prefix lets secret scanners recognise a leaked key. Only
two things about it are stored (table ``api_keys``): its first :data:`PREFIX_CHARS` characters
(``lmf_`` and 8 random ones, unique, shown in listings and used to revoke it) and the sha256 of
the whole key. A fast unsalted hash is enough here, unlike for passwords: the key is random and
far too long to guess or to search from its hash (OWASP's password-storage advice is about
low-entropy secrets). A presented key is looked up by its prefix and its sha256 compared with
:func:`hmac.compare_digest` (constant time). The key itself is returned once, by
:func:`create_key`, and can never be read back.

Helpers take the caller's session and never commit.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import NotFound, ValidationFailed
from store.models import ApiKey, new_id, utcnow

KEY_PREFIX = "lmf_"
_ALPHABET = string.ascii_letters + string.digits
_RANDOM_CHARS = 40  # 40 * log2(62) = 238 bits
PREFIX_CHARS = len(KEY_PREFIX) + 8
# A principal's name: what ``owner_id`` stores.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,39}$"
# ``last_used_at`` is written at most this often per key (a write per request would serialise
# every request on SQLite's writer lock).
LAST_USED_RESOLUTION = timedelta(minutes=1)
_KEY_RE = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9]{{{_RANDOM_CHARS}}}$")


@dataclass(frozen=True)
class CreatedKey:
    """A new key: ``key`` is the secret, shown once; ``row`` is what is stored."""

    key: str
    row: ApiKey


def hash_key(key: str) -> str:
    """The sha256 (hex) of ``key``, as stored in ``api_keys.key_hash``."""
    return hashlib.sha256(key.encode()).hexdigest()


def validate_name(name: str) -> str:
    """``name`` if it is a valid principal name (1-40 characters: letters, digits and
    ``_ . @ -``, starting with a letter or digit); else :class:`ValidationFailed` (``name``)."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValidationFailed(
            "name must be 1-40 characters: letters, digits and _ . @ -, starting with a letter "
            "or digit", field="name")
    return name


def create_key(session: Session, name: str, *, is_admin: bool = False) -> CreatedKey:
    """A new key for principal ``name`` (added, not committed). Raises
    :class:`ValidationFailed` for an invalid name."""
    validate_name(name)
    key = KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))
    row = ApiKey(id=new_id("key"), name=name, prefix=key[:PREFIX_CHARS], key_hash=hash_key(key),
                 is_admin=is_admin, created_at=utcnow())
    session.add(row)
    session.flush()
    return CreatedKey(key, row)


def verify_key(session: Session, key: str, *, touch: bool = True) -> ApiKey | None:
    """The unrevoked key row that ``key`` is, or None. The comparison of hashes takes
    constant time. ``touch``: update ``last_used_at`` (at most once per
    :data:`LAST_USED_RESOLUTION`; the caller commits)."""
    if not _KEY_RE.fullmatch(key):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == key[:PREFIX_CHARS]))
    presented = hash_key(key)
    if row is None:
        hmac.compare_digest(presented, presented)  # the same work as a found key
        return None
    if not hmac.compare_digest(presented, row.key_hash) or row.revoked_at is not None:
        return None
    now = utcnow()
    if touch and (row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION):
        row.last_used_at = now
    return row


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(session: Session, prefix: str, at: datetime | None = None) -> ApiKey:
    """Revoke the key whose visible prefix is ``prefix`` (a whole key is accepted too: its
    prefix is used; revoking twice keeps the first time). Raises :class:`NotFound` when no
    key has that prefix; the message never repeats more than a prefix's length of what was
    given, so a whole key pasted by mistake does not end up in a log."""
    prefix = prefix[:PREFIX_CHARS]
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        raise NotFound(f"no API key with prefix {prefix!r}")
    session.execute(update(ApiKey).where(ApiKey.id == row.id, ApiKey.revoked_at.is_(None))
                    .values(revoked_at=at or utcnow()))
    session.refresh(row)
    return row


def has_admin_key(session: Session) -> bool:
    """Whether any admin key was ever created (revoked ones included): ``lmforge up`` makes
    the first one only when none was."""
    return session.scalar(select(ApiKey.id).where(ApiKey.is_admin.is_(True)).limit(1)) is not None
