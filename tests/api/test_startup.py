"""Several API processes starting at once on a new database: a real ``uvicorn app.main:app
--workers 3`` (three processes, each upgrading the schema in its startup), on a new SQLite file
and on a new PostgreSQL database, several times in a row. Before the schema lock, about one
start in three lost the race and uvicorn stopped the whole API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from lmforge import proctree
from lmforge.processes import free_port, kill_process_group, spawn, terminate

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = 3
ROUNDS = 4
# Safety net for one start (three interpreters importing FastAPI, SQLAlchemy, Celery and
# migrating a database on a busy 2-core machine), not a measured bound.
START_DEADLINE_S = 180.0


def _start_api(database_url: str, redis_url: str, home: Path) -> tuple[subprocess.Popen[bytes],
                                                                       Path, str]:
    port = free_port()
    env = {**os.environ, "LMFORGE_HOME": str(home), "DATABASE_URL": database_url,
           "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "uvicorn.log"
    with open(log_path, "ab") as log:
        proc = spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--workers", str(WORKERS),
                      "--host", "127.0.0.1", "--port", str(port)], env=env, log=log,
                     cwd=REPO_ROOT)
    return proc, log_path, f"http://127.0.0.1:{port}"


def _wait_all_workers_ready(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until each of the three worker processes has logged the end of its startup (each
    upgraded the schema in its lifespan); fails if uvicorn exits or a startup fails."""
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        log = log_path.read_text(errors="replace")
        assert "Application startup failed" not in log, log
        assert proc.poll() is None, f"uvicorn exited with {proc.returncode}:\n{log}"
        if len(re.findall(r"Application startup complete", log)) >= WORKERS:
            return
        assert time.monotonic() < deadline, f"the workers did not start:\n{log}"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    terminate(proc, timeout=60)
    kill_process_group(proc)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_uvicorn_with_three_workers_starts_on_a_new_database_every_time(
    backend: str, tmp_path: Path, redis_url: str, request: pytest.FixtureRequest
) -> None:
    for round_ in range(ROUNDS):
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'round{round_}' / 'lmforge.db'}"
        else:
            make: Callable[[], str] = request.getfixturevalue("make_postgres_database")
            url = make()
        proc, log_path, base_url = _start_api(url, redis_url, tmp_path / f"home{round_}")
        try:
            _wait_all_workers_ready(proc, log_path)
            workers = {p for p in proctree.descendants(proc.pid) if proctree.alive(p)}
            assert len(workers) >= WORKERS, log_path.read_text(errors="replace")
            # Fresh connections land on whichever worker accepts them; every answer is healthy.
            for _ in range(3 * WORKERS):
                with httpx.Client(base_url=base_url, timeout=30.0) as client:
                    r = client.get("/healthz")
                assert r.status_code == 200, r.text
                assert r.json() == {"status": "ok", "database": True, "broker": True}
            assert proc.poll() is None
            log = log_path.read_text(errors="replace")
            assert "Traceback" not in log, log
        finally:
            _stop(proc)
