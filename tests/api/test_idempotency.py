"""``Idempotency-Key`` on ``POST /v1/jobs`` and ``POST /v1/datasets``: a retry returns the
original (200), another request with the key is 409, keys expire after
``LMFORGE_IDEMPOTENCY_TTL_S``, and requests racing with one key create exactly one resource,
on a SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import idempotency
from app import jobs as app_jobs
from app.deps import get_enqueuer
from app.main import create_app
from store.db import session_scope
from store.models import Dataset, IdempotencyKey, Job, utcnow
from store.settings import Settings
from tests.api.conftest import CORPUS, RecordingEnqueuer, authorize, small_spec, upload

KEY = "Idempotency-Key"
# Requests racing with one key (threads of one test client; the routes run in its threadpool).
RACERS = 8


@pytest.fixture(params=["sqlite", "postgres"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'api.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    return Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=url,
                    LMFORGE_MAX_UPLOAD_BYTES=64 * 1024)


@pytest.fixture
def any_client(backend_settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    """The API on SQLite or on PostgreSQL (the test runs once for each)."""
    app = create_app(backend_settings)
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c)
        yield c


def _factory(client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = client.app.state.session_factory  # type: ignore[attr-defined]
    return factory


def _count(client: TestClient, model: type[Any]) -> int:
    with _factory(client)() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _dataset_files(client: TestClient) -> list[Path]:
    root = client.app.state.storage.root / "datasets"  # type: ignore[attr-defined]
    return sorted(root.glob("*.txt")) if root.exists() else []


# -- jobs ----------------------------------------------------------------------------------------


def test_a_retry_with_the_same_key_and_spec_returns_the_job_with_200(
    client: TestClient, dataset_id: str, enqueuer: RecordingEnqueuer
) -> None:
    spec = small_spec(dataset_id)
    first = client.post("/v1/jobs", json=spec, headers={KEY: "order-42"})
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = client.post("/v1/jobs", json=spec, headers={KEY: "order-42"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json() == client.get(f"/v1/jobs/{first.json()['id']}").json()
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert again.headers["idempotent-replayed"] == "true"
    assert enqueuer.sent == [first.json()["id"]]  # enqueued once
    assert _count(client, Job) == 1


def test_the_same_spec_spelled_differently_is_the_same_request(
    client: TestClient, dataset_id: str
) -> None:
    """Compared as validated: key order and defaults written out do not make a new request."""
    spec = small_spec(dataset_id)
    first = client.post("/v1/jobs", json=spec, headers={KEY: "k"}).json()
    spelled_out = {**dict(reversed(list(spec.items()))), "val_fraction": 0.1}
    again = client.post("/v1/jobs", json=spelled_out, headers={KEY: "k"})
    assert (again.status_code, again.json()["id"]) == (200, first["id"])


def test_the_same_key_with_another_spec_is_409_and_creates_nothing(
    client: TestClient, dataset_id: str
) -> None:
    first = client.post("/v1/jobs", json=small_spec(dataset_id), headers={KEY: "k"}).json()
    r = client.post("/v1/jobs", json=small_spec(dataset_id, max_steps=6), headers={KEY: "k"})
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("idempotency_key_reused", KEY)
    assert err["details"] == [{"resource_id": first["id"]}]
    assert _count(client, Job) == 1


def test_requests_without_a_key_are_not_deduplicated(client: TestClient, dataset_id: str) -> None:
    spec = small_spec(dataset_id)
    ids = {client.post("/v1/jobs", json=spec).json()["id"] for _ in range(2)}
    assert len(ids) == 2


@pytest.mark.parametrize("bad", ["", "x" * 256, "caf\xe9", "tab\there"])
def test_an_invalid_key_is_422_naming_the_header(
    client: TestClient, dataset_id: str, bad: str
) -> None:
    r = client.post("/v1/jobs", json=small_spec(dataset_id),
                    headers={KEY.encode(): bad.encode("latin-1")})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == KEY
    assert _count(client, Job) == 0


def test_keys_of_255_printable_characters_are_accepted(client: TestClient,
                                                       dataset_id: str) -> None:
    key = ("~ !azAZ09" * 40)[:255]
    assert client.post("/v1/jobs", json=small_spec(dataset_id),
                       headers={KEY: key}).status_code == 201


def test_a_key_expires_after_the_ttl_and_then_creates_a_new_job(
    client: TestClient, dataset_id: str, settings: Settings
) -> None:
    """A key older than LMFORGE_IDEMPOTENCY_TTL_S is forgotten: the same key then creates a
    new job, even with another spec (the row's age is set in the database, no waiting)."""
    first = client.post("/v1/jobs", json=small_spec(dataset_id), headers={KEY: "k"}).json()
    _age_keys(client, settings.idempotency_ttl_s + 1)
    r = client.post("/v1/jobs", json=small_spec(dataset_id, max_steps=6), headers={KEY: "k"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] != first["id"]
    again = client.post("/v1/jobs", json=small_spec(dataset_id, max_steps=6), headers={KEY: "k"})
    assert (again.status_code, again.json()["id"]) == (200, r.json()["id"])
    # Just inside the TTL the key still holds.
    _age_keys(client, settings.idempotency_ttl_s - 60)
    assert client.post("/v1/jobs", json=small_spec(dataset_id, max_steps=6),
                       headers={KEY: "k"}).status_code == 200


def test_expired_keys_are_purged(client: TestClient, dataset_id: str, settings: Settings,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("a", "b"):
        client.post("/v1/jobs", json=small_spec(dataset_id), headers={KEY: key})
    _age_keys(client, settings.idempotency_ttl_s + 1)
    monkeypatch.setattr(idempotency, "_last_purge", -idempotency.PURGE_INTERVAL_S)
    assert client.post("/v1/jobs", json=small_spec(dataset_id),
                       headers={KEY: "c"}).status_code == 201
    with _factory(client)() as s:
        assert list(s.scalars(select(IdempotencyKey.key))) == ["c"]


def _age_keys(client: TestClient, seconds: float) -> None:
    with session_scope(_factory(client)) as s:
        s.execute(update(IdempotencyKey)
                  .values(created_at=utcnow() - timedelta(seconds=seconds)))


# -- datasets ------------------------------------------------------------------------------------


def _upload(client: TestClient, text: str, key: str, name: str = "corpus") -> Any:
    return client.post("/v1/datasets", files={"file": ("corpus.txt", text.encode(), "text/plain")},
                       data={"name": name}, headers={KEY: key})


def test_a_retried_upload_returns_the_dataset_with_200_and_keeps_one_copy(
    client: TestClient,
) -> None:
    first = _upload(client, CORPUS, "up-1")
    assert first.status_code == 201, first.text
    again = _upload(client, CORPUS, "up-1")
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/v1/datasets/{first.json()['id']}"
    assert _count(client, Dataset) == 1
    assert [p.stem for p in _dataset_files(client)] == [first.json()["id"]]


def test_the_same_key_with_another_file_or_name_is_409_and_stores_nothing(
    client: TestClient,
) -> None:
    first = _upload(client, CORPUS, "up-1").json()
    for r in (_upload(client, CORPUS + "more\n", "up-1"),
              _upload(client, CORPUS, "up-1", name="other")):
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert _count(client, Dataset) == 1
    assert [p.stem for p in _dataset_files(client)] == [first["id"]]


def test_keys_of_jobs_and_datasets_are_separate(client: TestClient) -> None:
    ds = _upload(client, CORPUS, "shared").json()["id"]
    r = client.post("/v1/jobs", json=small_spec(ds), headers={KEY: "shared"})
    assert r.status_code == 201, r.text


# -- races ---------------------------------------------------------------------------------------


def test_concurrent_submissions_with_one_key_create_one_job(
    any_client: TestClient, enqueuer: RecordingEnqueuer
) -> None:
    """RACERS threads send the same keyed submission at once: one job, every answer names it
    (one 201, the rest 200), one enqueue."""
    ds = upload(any_client).json()["id"]
    spec = small_spec(ds)
    results = _race(lambda: any_client.post("/v1/jobs", json=spec, headers={KEY: "race"}))
    assert all(r.status_code in (200, 201) for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert sorted(r.status_code for r in results) == [200] * (RACERS - 1) + [201]
    assert _count(any_client, Job) == 1
    assert len(enqueuer.sent) == 1


def test_concurrent_uploads_with_one_key_create_one_dataset(any_client: TestClient) -> None:
    results = _race(lambda: _upload(any_client, CORPUS, "race"))
    assert all(r.status_code in (200, 201) for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert _count(any_client, Dataset) == 1
    assert len(_dataset_files(any_client)) == 1


def test_a_key_stored_by_a_concurrent_request_after_the_check_wins(
    any_client: TestClient, enqueuer: RecordingEnqueuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving the primary key arbitrates, forced: request A checks the key (not
    there), request B then runs to completion with the same key, and only then does A insert
    its job and the key. A's insert fails on the key's primary key, A rolls back (its job
    with it) and answers B's job with 200."""
    ds = upload(any_client).json()["id"]
    spec = small_spec(ds)
    real_create = app_jobs.create_job
    inner: list[Any] = []

    def create_after_a_rival(session: Session, principal: Any, job_spec: Any,
                             **kwargs: Any) -> Job:
        if not inner:  # request A: let request B through first
            inner.append(None)
            inner[0] = any_client.post("/v1/jobs", json=spec, headers={KEY: "k"})
        return real_create(session, principal, job_spec, **kwargs)

    monkeypatch.setattr(app_jobs, "create_job", create_after_a_rival)
    a = any_client.post("/v1/jobs", json=spec, headers={KEY: "k"})
    b = inner[0]
    assert (b.status_code, a.status_code) == (201, 200), (b.text, a.text)
    assert a.json()["id"] == b.json()["id"]
    assert a.headers["idempotent-replayed"] == "true"
    assert _count(any_client, Job) == 1
    assert enqueuer.sent == [b.json()["id"]]


def _race(send: Any) -> list[Any]:
    barrier = threading.Barrier(RACERS)
    results: list[Any] = [None] * RACERS
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = send()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results
