"""Who is asking: API keys (``Authorization: Bearer <key>``) and the principal they act for.

Every ``/v1`` route depends on :data:`PrincipalDep` (``app.routes`` adds it to the whole
router), so no route can be served without a valid key: a missing, malformed, unknown or
revoked key is a 401 with ``WWW-Authenticate: Bearer`` (RFC 6750) in the API's error shape.
Keys are made and checked by :mod:`store.apikeys` (stored as sha256 hashes, compared in
constant time).

A principal is the ``name`` its keys were created with; every dataset and job records the
principal that created it (``owner_id``), and :func:`owner_filter` is the one condition that
the lookups in :mod:`app.jobs` and :mod:`app.datasets` apply, so that another principal's
resources answer 404 and never appear in lists. An admin principal sees everything.

``LMFORGE_AUTH=disabled`` turns keys off: every request acts as the admin principal
:data:`ANONYMOUS`. ``lmforge api`` and ``lmforge up`` allow it only on a loopback address
(:func:`check_bind`), and log a warning.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import ColumnElement, true

from store import apikeys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: ``id`` is what ``owner_id`` columns store (the key's name),
    ``name`` the same name for display, ``is_admin`` whether it sees every resource and may
    manage keys."""

    id: str
    name: str
    is_admin: bool


# The principal of every request when LMFORGE_AUTH=disabled.
ANONYMOUS = Principal(id="local", name="local", is_admin=True)

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (`lmf_...`): `lmforge keys create --name NAME` prints one, "
                "`lmforge up` prints the first admin key.",
)


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal of the request's API key. Raises a 401 ``HTTPException`` (with
    ``WWW-Authenticate: Bearer``) when the ``Authorization`` header is missing, is not a
    Bearer credential, or names no unrevoked key. Updates the key's ``last_used_at``
    (at most once a minute)."""
    settings = request.app.state.settings
    if settings.auth == "disabled":
        return ANONYMOUS
    if credentials is None:
        raise _unauthorized("an API key is required: send Authorization: Bearer <key>")
    with request.app.state.session_factory() as session:
        row = apikeys.verify_key(session, credentials.credentials)
        if row is None:
            raise _unauthorized("the API key is invalid or revoked", "invalid_token")
        principal = Principal(id=row.name, name=row.name, is_admin=row.is_admin)
        if session.dirty:
            session.commit()  # last_used_at
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    """The principal if it is an admin; else a 403 (``forbidden``): key management is for
    admin keys only."""
    if not principal.is_admin:
        raise HTTPException(403, "this route needs an admin API key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def owner_filter(principal: Principal, model: Any) -> ColumnElement[bool]:
    """The SQL condition that selects the rows of ``model`` (a class with ``owner_id``) that
    ``principal`` may see: its own, or every row for an admin."""
    if principal.is_admin:
        return true()
    condition: ColumnElement[bool] = model.owner_id == principal.id
    return condition


def can_see(principal: Principal, owner_id: str | None) -> bool:
    """Whether ``principal`` may see a row owned by ``owner_id`` (the Python side of
    :func:`owner_filter`)."""
    return principal.is_admin or owner_id == principal.id


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(auth: str, host: str) -> None:
    """Refuse (``SystemExit`` with the reason) to serve with ``LMFORGE_AUTH=disabled`` on a
    non-loopback ``host``; log a warning when it is disabled on a loopback one."""
    if auth != "disabled":
        return
    if not is_loopback(host):
        raise SystemExit(
            f"LMFORGE_AUTH=disabled is only allowed on a loopback address; refusing to serve "
            f"without authentication on {host}")
    log.warning("LMFORGE_AUTH=disabled: the API asks for no key and every request acts as an "
                "admin (only %s can reach it)", host)
