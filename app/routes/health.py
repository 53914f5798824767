"""``GET /healthz``: the state of each part the API depends on (the database, the broker)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from sqlalchemy import text

from app.deps import EnqueuerDep, SessionDep
from app.http_errors import DATABASE_RETRY_AFTER_S
from app.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "a part is down (named in the body)"}},
)
def healthz(response: Response, session: SessionDep, enqueuer: EnqueuerDep) -> Health:
    """``{"status": "ok"|"degraded", "database": bool, "broker": bool}``: 200 when every part
    answers, 503 with ``Retry-After`` when one does not (the body says which).

    With the broker down the API still takes jobs (they stay ``queued`` and are enqueued
    when it is back) and serves reads; with the database down every other route answers 503.
    The broker check waits at most about 2 s (``store.queue.CeleryEnqueuer.ping``)."""
    try:
        session.execute(text("SELECT 1"))
        database = True
    except Exception as exc:
        log.warning("database not reachable: %s", type(exc).__name__)
        database = False
    broker = enqueuer.ping()
    ok = database and broker is not False
    if not ok:
        response.status_code = 503
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
    return Health(status="ok" if ok else "degraded", database=database, broker=broker)
