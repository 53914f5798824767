"""Alembic environment: online migrations only, batch mode on SQLite (ALTER via copy-and-move).

The URL comes from the Alembic config (``store.db.alembic_config`` sets it from
``Settings.sqlalchemy_url``; ``alembic.ini`` falls back to ``DATABASE_URL``/``LMFORGE_HOME``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from store.db import is_sqlite, make_engine
from store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from store.settings import get_settings

    return get_settings().sqlalchemy_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite(str(connection.engine.url)),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
