"""API unit tests: a real app on a real SQLite file in tmp_path; only the enqueuer is a fake
(recording), installed with ``app.dependency_overrides``. No Redis, no Celery, no torch.

``client`` sends a real API key of the (non-admin) principal ``tester`` with every request;
``make_key`` creates more keys in the same database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.deps import get_enqueuer
from app.main import create_app
from core.routing import Route
from store import apikeys
from store.db import session_scope
from store.settings import Settings

# Enough text for the default spec: one batch of 32 x 65 tokens after holding out 10%.
CORPUS = "the quick brown fox jumps over the lazy dog\n" * 80  # 3520 chars, 720 words


class RecordingEnqueuer:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.routes: dict[str, Route] = {}  # job id -> the route it was enqueued on
        self.fail: Exception | None = None

    def enqueue(self, job_id: str, route: Route) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(job_id)
        self.routes[job_id] = route

    def ping(self) -> bool:
        return self.fail is None


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        LMFORGE_HOME=tmp_path / "home",
        DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
        LMFORGE_MAX_UPLOAD_BYTES=64 * 1024,
    )


@pytest.fixture
def enqueuer() -> RecordingEnqueuer:
    return RecordingEnqueuer()


def create_key(factory: sessionmaker[Session], name: str, *, admin: bool = False) -> str:
    """A new API key of principal ``name``, stored in the database of ``factory``."""
    with session_scope(factory) as s:
        return apikeys.create_key(s, name, is_admin=admin).key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def authorize(client: TestClient, name: str = "tester", *, admin: bool = False) -> str:
    """Create a key of principal ``name`` in the started ``client``'s database and send it
    with the client's requests from now on; returns the key."""
    key = create_key(client.app.state.session_factory, name,  # type: ignore[attr-defined]
                     admin=admin)
    client.headers.update(bearer(key))
    return key


@pytest.fixture
def client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    app = create_app(settings)
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c)
        yield c


@pytest.fixture
def session_factory(client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = client.app.state.session_factory  # type: ignore[attr-defined]
    return factory


@pytest.fixture
def make_key(session_factory: sessionmaker[Session]) -> Callable[..., str]:
    """``make_key(name, admin=False)``: a new API key in the client's database."""

    def make(name: str, admin: bool = False) -> str:
        return create_key(session_factory, name, admin=admin)

    return make


def upload(client: TestClient, text: str | bytes = CORPUS, name: str | None = "corpus") -> Any:
    data = text.encode() if isinstance(text, str) else text
    form = {"name": name} if name is not None else {}
    return client.post("/v1/datasets", files={"file": ("corpus.txt", data, "text/plain")},
                       data=form)


@pytest.fixture
def dataset_id(client: TestClient) -> str:
    r = upload(client)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def small_spec(dataset_id: str, **training: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "dataset_id": dataset_id,
        "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
        "training": {"batch_size": 4, "seq_len": 8, "max_steps": 5, **training},
    }
