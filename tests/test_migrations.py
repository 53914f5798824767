"""The migration creates exactly the models' schema, and upgrades and downgrades cleanly, on a
SQLite file and on a real PostgreSQL server (``postgres_url`` from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from store.db import downgrade_database, make_engine, upgrade_database
from store.models import Base

TABLES = {"alembic_version", "checkpoints", "datasets", "jobs", "metrics"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'migrations.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_upgrade_matches_the_models_and_downgrade_removes_everything(database_url: str) -> None:
    upgrade_database(database_url)
    upgrade_database(database_url)  # idempotent: the service upgrades on every start
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == TABLES
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []  # `alembic check`
        downgrade_database(database_url, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"alembic_version"}
        upgrade_database(database_url)  # and back up again from base
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == TABLES
    finally:
        engine.dispose()


def test_sqlite_connections_use_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
