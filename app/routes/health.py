"""``GET /healthz``: is the database reachable, and the broker."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from sqlalchemy import text

from app.deps import EnqueuerDep, SessionDep
from app.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(response: Response, session: SessionDep, enqueuer: EnqueuerDep) -> Health:
    """200 when the database answers (``status`` "degraded" if the broker does not: jobs can
    be read but new ones fail to enqueue); 503 when the database does not."""
    try:
        session.execute(text("SELECT 1"))
        database = True
    except Exception:
        log.warning("database not reachable", exc_info=True)
        database = False
    broker = enqueuer.ping()
    if not database:
        response.status_code = 503
    return Health(status="ok" if database and broker else "degraded", database=database,
                  broker=broker)
