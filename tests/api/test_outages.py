"""A database outage: with the real PostgreSQL server stopped, every route answers 503 with
``Retry-After`` and the JSON error body (never 500), ``/healthz`` says the database is down,
and once the server is back the same API process serves again without a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.deps import get_enqueuer
from app.main import create_app
from core.contract import CheckpointBlob
from core.contract import CheckpointKind as K
from store.db import session_scope
from store.progress import claim_job, record_checkpoint
from store.settings import Settings
from store.sweep import sweep_queued
from tests.api.conftest import RecordingEnqueuer, authorize, small_spec, upload

# Safety net while the restarted server comes back, not a measured bound.
RECOVERY_DEADLINE_S = 120.0


def _requests(
    job_id: str, ckpt_id: str, ds_id: str, key_prefix: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """One request per route and method of the API, with real ids."""
    j, files = f"/v1/jobs/{job_id}", {"file": ("c.txt", b"some text\n" * 50, "text/plain")}
    return [
        ("POST", "/v1/datasets", {"files": files}),
        ("GET", "/v1/datasets", {}),
        ("GET", f"/v1/datasets/{ds_id}", {}),
        ("DELETE", f"/v1/datasets/{ds_id}", {}),
        ("POST", "/v1/jobs", {"json": small_spec(ds_id)}),
        ("POST", "/v1/jobs", {"json": small_spec(ds_id), "headers": {"Idempotency-Key": "k"}}),
        ("GET", "/v1/jobs", {}),
        ("GET", j, {}),
        ("POST", f"{j}/cancel", {}),
        ("GET", f"{j}/metrics", {}),
        ("GET", f"{j}/metrics.csv", {}),
        ("GET", f"{j}/events", {}),
        ("GET", f"{j}/samples", {}),
        ("GET", f"{j}/result", {}),
        ("GET", f"{j}/webhooks", {}),
        ("GET", f"{j}/tensorboard.tar.gz", {}),
        ("GET", f"{j}/checkpoints", {}),
        ("GET", f"{j}/checkpoints/{ckpt_id}/download", {}),
        ("HEAD", f"{j}/checkpoints/{ckpt_id}/download", {}),
        ("GET", f"{j}/checkpoints/{ckpt_id}/export", {}),
        ("POST", f"{j}/generate", {"json": {"checkpoint": "last"}}),
        ("POST", f"{j}/score", {"json": {"text": "some text"}}),
        ("POST", f"{j}/classify", {"json": {"texts": ["some text"]}}),
        ("POST", "/v1/keys", {"json": {"name": "other"}}),
        ("GET", "/v1/keys", {}),
        ("DELETE", f"/v1/keys/{key_prefix}", {}),
    ]


def _route_template(path: str, job_id: str, ckpt_id: str, ds_id: str, key_prefix: str) -> str:
    return (path.replace(ckpt_id, "{checkpoint_id}").replace(job_id, "{job_id}")
            .replace(ds_id, "{dataset_id}").replace(key_prefix, "{prefix}"))


def test_every_route_answers_503_while_the_database_is_down_and_recovers(
    private_postgres: Any, tmp_path: Path, enqueuer: RecordingEnqueuer
) -> None:
    url = private_postgres.create_database("lmforge_outage")
    settings = Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=url)
    app = create_app(settings)
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with TestClient(app, raise_server_exceptions=False) as client:
        authorize(client, "admin", admin=True)
        other_key = client.post("/v1/keys", json={"name": "other"}).json()["prefix"]
        ds_id = upload(client).json()["id"]
        job = client.post("/v1/jobs", json=small_spec(ds_id)).json()
        factory = client.app.state.session_factory  # type: ignore[attr-defined]
        storage = client.app.state.storage  # type: ignore[attr-defined]
        with session_scope(factory) as s:
            claim_job(s, job["id"], "w1")
        with session_scope(factory) as s:
            ckpt, _ = record_checkpoint(s, storage, job["id"], 1,
                                        CheckpointBlob(K.LAST, 2, b"weights" * 100, {}), 3)
        requests = _requests(job["id"], ckpt.id, ds_id, other_key)
        # Every route of the API is exercised below.
        routes = {(m.upper(), path) for path, ops in app.openapi()["paths"].items()
                  for m in ops if path != "/healthz"}
        assert routes == {(m, _route_template(p, job["id"], ckpt.id, ds_id, other_key))
                          for m, p, _ in requests}
        datasets_before = sorted((storage.root / "datasets").iterdir())

        private_postgres.stop()
        for method, path, kwargs in requests:
            r = client.request(method, path, **kwargs)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert int(r.headers["retry-after"]) > 0, (method, path)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "database_unavailable", (method, path)
        health = client.get("/healthz")
        assert (health.status_code, health.json()) == (
            503, {"status": "degraded", "database": False, "broker": True})
        # The upload that met the outage left nothing in storage.
        assert sorted((storage.root / "datasets").iterdir()) == datasets_before

        private_postgres.start()
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the API did not see the database come back"
            time.sleep(0.2)
        again = client.get(f"/v1/jobs/{job['id']}")
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "running"
        created = client.post("/v1/jobs", json=small_spec(ds_id))
        assert created.status_code == 201, created.text
        assert {j["id"] for j in client.get("/v1/jobs").json()["data"]} == {
            job["id"], created.json()["id"]}


def test_a_submission_while_the_broker_is_down_is_stored_queued_and_answered_201(
    tmp_path: Path,
) -> None:
    """The real Celery producer against a real Redis that is stopped: the job is stored
    ``queued`` with ``enqueued_at`` null (the queued sweep hands it over later), the answer is
    201 and comes back without hanging (kombu's bounded publish retries); ``/healthz`` says
    the broker is down. Once Redis is back, the next submission is enqueued and stamped, and
    the queued sweep (as the workers run it) enqueues the job that met the outage, once."""
    from lmforge.processes import EmbeddedServerError, RedisServer, free_port
    from store.queue import QUEUE, RedisQueueInspector

    try:
        broker = RedisServer(port=free_port(), dir=tmp_path / "redis").start()
    except EmbeddedServerError as exc:
        pytest.skip(f"no Redis: {exc}")
    try:
        settings = Settings(LMFORGE_HOME=tmp_path / "home", REDIS_URL=broker.url,
                            DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}")
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            authorize(client)
            ds_id = upload(client).json()["id"]
            broker.stop()
            r = client.post("/v1/jobs", json=small_spec(ds_id))
            assert r.status_code == 201, r.text
            assert (r.json()["status"], r.json()["enqueued_at"]) == ("queued", None)
            assert client.get(f"/v1/jobs/{r.json()['id']}").json()["enqueued_at"] is None
            health = client.get("/healthz")
            assert (health.status_code, health.json()) == (
                503, {"status": "degraded", "database": True, "broker": False})

            broker.start()
            deadline = time.monotonic() + RECOVERY_DEADLINE_S
            while client.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline, "the API did not see the broker come back"
                time.sleep(0.2)
            later = client.post("/v1/jobs", json=small_spec(ds_id))
            assert later.status_code == 201, later.text
            assert later.json()["enqueued_at"] is not None
            queue = RedisQueueInspector(broker.url)
            messages = queue.messages([QUEUE])  # small_spec: device "auto", queue lmforge
            assert len(messages) == 1 and later.json()["id"].encode() in messages[0]
            enqueuer = client.app.state.enqueuer  # type: ignore[attr-defined]
            factory = client.app.state.session_factory  # type: ignore[attr-defined]
            swept = sweep_queued(factory, enqueuer, settings, inspector=None)
            assert swept.queued == [r.json()["id"]]
            assert client.get(f"/v1/jobs/{r.json()['id']}").json()["enqueued_at"] is not None
            assert sweep_queued(factory, enqueuer, settings, inspector=None).queued == []
            assert sum(r.json()["id"].encode() in m for m in queue.messages([QUEUE])) == 1
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (OperationalError("SELECT 1", {}, Exception("database is locked")), 503, "database_busy"),
        (PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"), 503,
         "database_busy"),
        (InterfaceError("SELECT 1", {}, Exception("connection already closed")), 503,
         "database_unavailable"),
        (DBAPIError("SELECT 1", {}, Exception("server closed the connection"),
                    connection_invalidated=True), 503, "database_unavailable"),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), 500, "internal_error"),
        (ProgrammingError("SELEC 1", {}, Exception("syntax error")), 500, "internal_error"),
    ],
)
def test_which_database_errors_are_outages(
    client: TestClient, exc: Exception, status: int, code: str
) -> None:
    """The classification in app.http_errors: a lost, refused, locked or exhausted database is
    a 503 to retry; an integrity or programming error is a bug, 500."""
    from app.deps import get_session

    def failing() -> None:
        raise exc

    client.app.dependency_overrides[get_session] = failing  # type: ignore[attr-defined]
    r = client.get("/v1/jobs")
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert ("retry-after" in r.headers) == (status == 503)
