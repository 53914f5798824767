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

TABLES = {"alembic_version", "api_keys", "checkpoints", "datasets", "idempotency_keys",
          "job_attempts", "job_samples", "jobs", "metrics", "webhook_deliveries"}


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


def test_metric_rows_survive_the_move_to_named_values_and_back(database_url: str) -> None:
    """0001 -> 0002 copies every metric column into ``values``; 0002 -> 0001 copies back."""
    from sqlalchemy import text

    upgrade_database(database_url, "0001")
    engine = make_engine(database_url)
    row = {"epoch": 0.5, "train_loss": 2.25, "lr": 0.001, "grad_norm": 0.75,
           "tokens_per_s": 1234.5, "elapsed_s": 1.5, "tokens_seen": 3 * 2**31,
           "val_loss": None, "val_ppl": None, "val_bpc": None, "val_accuracy": None,
           "val_top5_accuracy": None}
    evaluated = {**row, "val_loss": 2.0, "val_ppl": 7.38905609893065, "val_bpc": 2.885,
                 "val_accuracy": 0.25, "val_top5_accuracy": 0.625}
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, status, spec, created_at, attempts, cancel_requested, "
                "progress) VALUES ('job_1', 'running', '{}', CURRENT_TIMESTAMP, 1, false, '{}')"))
            for step, values in ((1, row), (2, evaluated)):
                cols = ", ".join(values)
                params = ", ".join(f":{k}" for k in values)
                conn.execute(text(f"INSERT INTO metrics (job_id, step, {cols}) "
                                  f"VALUES ('job_1', {step}, {params})"), values)
        upgrade_database(database_url)
        with engine.connect() as conn:
            got = conn.execute(text('SELECT step, "values" FROM metrics ORDER BY step')).all()
        import json

        decoded = [(s, v if isinstance(v, dict) else json.loads(v)) for s, v in got]
        assert decoded == [(1, row), (2, evaluated)]
        downgrade_database(database_url, "0001")
        with engine.connect() as conn:
            back = conn.execute(text("SELECT * FROM metrics ORDER BY step")).mappings().all()
        assert [{k: v for k, v in r.items() if k not in ("job_id", "step")} for r in back] == [
            row, evaluated]
    finally:
        engine.dispose()


# -- many processes upgrading one new database at once -------------------------------------------

_UPGRADER = """
import sys, time, pathlib
from store.db import upgrade_database
import alembic.command, alembic.config, alembic.script  # imported before the start line
url, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
upgrade_database(url)
"""
# Processes that start their upgrade at the same moment (the issue's "any number of API and
# worker processes start at once").
UPGRADERS = 6
# Safety net for one child, not a measured bound: interpreter start, imports and the upgrade.
UPGRADER_DEADLINE_S = 300


def test_concurrent_upgrades_of_a_new_database_all_succeed(
    database_url: str, tmp_path: Path
) -> None:
    """Six processes call ``upgrade_database`` on one new database at the same instant: each
    succeeds (the lock makes the others wait for the one that migrates) and the schema is at
    head, exactly the models'."""
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    children = []
    for i in range(UPGRADERS):
        ready = tmp_path / f"ready-{i}"
        children.append((ready, subprocess.Popen(
            [sys.executable, "-c", _UPGRADER, database_url, str(ready), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=Path(__file__).resolve().parents[1],
        )))
    deadline = time.monotonic() + UPGRADER_DEADLINE_S
    while not all(ready.exists() for ready, _ in children):
        assert all(p.poll() is None for _, p in children), "an upgrader exited before the start"
        assert time.monotonic() < deadline, "the upgraders did not get ready"
        time.sleep(0.01)
    go.touch()
    failures = []
    for _, proc in children:
        out, _ = proc.communicate(timeout=UPGRADER_DEADLINE_S)
        if proc.returncode != 0:
            failures.append(out[-3000:])
    assert not failures, "\n-----\n".join(failures)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == TABLES
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert context.get_current_heads() == _head()
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def _head() -> tuple[str, ...]:
    from alembic.script import ScriptDirectory

    from store.db import alembic_config

    return tuple(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())
