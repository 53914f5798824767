"""Engines, sessions and schema upgrades.

The caller owns the session: the API opens one per request (``app.deps.SessionDep``), the
worker one per unit of work (:func:`session_scope`). Helpers in ``app.jobs`` take a session and
never commit on their own; no transaction is held open across a training run.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, and_, create_engine, event, or_, select, text, true
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

T = TypeVar("T")

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# SQLite waits this long for a competing writer (API, worker, sweep) before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# A PostgreSQL server that does not answer fails a new connection after this many seconds (the
# API then answers 503) instead of holding the request for the operating system's TCP timeout.
# A ``connect_timeout`` in the URL's query takes precedence.
POSTGRES_CONNECT_TIMEOUT_S = 10
# The session-level advisory lock that serialises schema upgrades on PostgreSQL: a fixed
# 64-bit key (the first 8 bytes of sha256("lmforge.migrations"), signed).
MIGRATION_LOCK_KEY = -6855664189219731412


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # The busy timeout first: switching a new file to WAL takes a write lock, and without the
    # timeout a process that meets another one's lock fails at once ("database is locked").
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL: readers never block the writer (the API polls while the worker writes metrics).
    cur.execute("PRAGMA journal_mode=WAL")
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
    every connection. PostgreSQL: pre-ping pooled connections (the server may restart) and
    give up on a connection attempt after :data:`POSTGRES_CONNECT_TIMEOUT_S` seconds."""
    if is_sqlite(url):
        _ensure_sqlite_dir(url)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if make_url(url).get_backend_name() == "postgresql" and "connect_timeout" not in make_url(
        url
    ).query:
        connect_args = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
                        **kwargs.pop("connect_args", {})}
        kwargs["connect_args"] = connect_args
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


def sqlite_lock_path(url: str) -> Path | None:
    """The lock file of schema changes to the SQLite database at ``url``: next to the
    database, named ``<file>.migrations.lock``; None for an in-memory or ``file:`` URI
    database (nothing to share with another process)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).expanduser().resolve()
    return path.with_name(path.name + ".migrations.lock")


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Hold the database's schema lock: one process at a time changes the schema, the others
    wait here (without a time limit: they go on once the holder finishes or dies, since
    the lock is released with its holder's connection or file descriptor).

    PostgreSQL: the session-level advisory lock :data:`MIGRATION_LOCK_KEY`
    (``pg_advisory_lock``), held on a dedicated connection. SQLite: an exclusive ``flock`` on
    :func:`sqlite_lock_path` (created, never deleted). Other backends: no lock (logged).
    Raises ``OperationalError`` when the PostgreSQL server cannot be reached and ``OSError``
    when the lock file cannot be created."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        path = sqlite_lock_path(url)
        if path is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:  # "a": create it if need be, never truncate
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    if backend != "postgresql":
        log.warning("no schema lock for %s databases: start one process at a time", backend)
        yield
        return
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"),
                                 {"key": MIGRATION_LOCK_KEY})
                except Exception:  # closing the connection below releases it anyway
                    log.warning("could not release the schema lock", exc_info=True)
    finally:
        engine.dispose()


def upgrade_database(url: str, revision: str = "head") -> None:
    """Upgrade the schema at ``url`` to ``revision`` (idempotent; creates the SQLite file).

    What ``lmforge db upgrade``, the API's startup (every API process) and the compose
    ``migrate`` step call. Safe to call from any number of processes at once: the upgrade
    runs under :func:`migration_lock`, so one process applies the migrations and the others
    wait for it, then find the schema at ``revision`` and change nothing. Raises what Alembic
    and the driver raise (e.g. ``OperationalError`` when the database is unreachable)."""
    from alembic import command

    if is_sqlite(url):
        _ensure_sqlite_dir(url)
    # Alembic announces each of its plugins at INFO on every start: noise for an operator.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    with migration_lock(url):
        log.info("upgrading database schema to %s", revision)
        command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str = "base") -> None:
    """Downgrade the schema at ``url`` to ``revision``, under :func:`migration_lock`."""
    from alembic import command

    with migration_lock(url):
        command.downgrade(alembic_config(url), revision)


def newest_first_page(
    session: Session, model: type[T], limit: int, after: str | None,
    where: ColumnElement[bool] | None = None,
) -> tuple[list[T], bool]:
    """One page of ``model`` rows, newest first, and whether more follow. ``after`` is the id
    of the last row of the previous page: a keyset cursor over ``(created_at, id)``, stable
    while new rows arrive. ``where``: only rows matching it (the cursor too). Raises
    ``NotFound`` (field ``after``) for an unknown id."""
    from core.errors import NotFound

    created, ident = model.created_at, model.id  # type: ignore[attr-defined]
    query = select(model).order_by(created.desc(), ident.desc())
    if where is not None:
        query = query.where(where)
    if after is not None:
        cursor = session.scalar(select(model).where(ident == after, true() if where is None
                                                    else where))
        if cursor is None:
            raise NotFound(f"unknown cursor {after!r}: no item of this list has that id",
                           field="after")
        query = query.where(
            or_(created < cursor.created_at,  # type: ignore[attr-defined]
                and_(created == cursor.created_at, ident < cursor.id))  # type: ignore[attr-defined]
        )
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit
