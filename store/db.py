"""Engines, sessions and schema upgrades.

The caller owns the session: the API opens one per request (``app.deps.SessionDep``), the
worker one per unit of work (:func:`session_scope`). Helpers in ``app.jobs`` take a session and
never commit on their own; no transaction is held open across a training run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, and_, create_engine, event, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# SQLite waits this long for a competing writer (API, worker, sweep) before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer (the API polls while the worker writes metrics).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cur.close()


def _ensure_sqlite_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``).

    SQLite: creates the file's directory, turns on WAL, a busy timeout and foreign keys on
    every connection. PostgreSQL: pre-ping pooled connections (the server may restart)."""
    if is_sqlite(url):
        _ensure_sqlite_dir(url)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after the unit of work commits (routes
    # serialise them after the commit-then-enqueue sequence).
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on an exception."""
    with factory() as session, session.begin():
        yield session


def alembic_config(url: str) -> Any:
    """An Alembic ``Config`` for ``url`` whose script location is the installed ``migrations``
    package, so upgrades work from any working directory and from a wheel."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a password containing '%' must be escaped.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_database(url: str, revision: str = "head") -> None:
    """Upgrade the schema at ``url`` to ``revision`` (idempotent; creates the SQLite file).

    What ``lmforge db upgrade``, the API's startup and the compose ``migrate`` step call."""
    from alembic import command

    if is_sqlite(url):
        _ensure_sqlite_dir(url)
    log.info("upgrading database schema to %s", revision)
    # Alembic announces each of its plugins at INFO on every start: noise for an operator.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def newest_first_page(
    session: Session, model: type[T], limit: int, after: str | None
) -> tuple[list[T], bool]:
    """One page of ``model`` rows, newest first, and whether more follow. ``after`` is the id
    of the last row of the previous page: a keyset cursor over ``(created_at, id)``, stable
    while new rows arrive. Raises ``ValidationFailed`` (field ``after``) for an unknown id."""
    from core.errors import ValidationFailed

    created, ident = model.created_at, model.id  # type: ignore[attr-defined]
    query = select(model).order_by(created.desc(), ident.desc())
    if after is not None:
        cursor = session.get(model, after)
        if cursor is None:
            raise ValidationFailed(f"unknown cursor {after!r}", field="after")
        query = query.where(
            or_(created < cursor.created_at,  # type: ignore[attr-defined]
                and_(created == cursor.created_at, ident < cursor.id))  # type: ignore[attr-defined]
        )
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit
