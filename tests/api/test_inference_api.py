"""``POST /v1/jobs/{id}/generate|score|classify`` in the API process (no torch): the job,
ownership, task and checkpoint checks, the request bounds, and the answer when the inference
server cannot be reached. The calls that reach a real inference server are in
tests/e2e/test_inference.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.deps import get_enqueuer
from app.main import create_app
from core.contract import CheckpointBlob
from core.contract import CheckpointKind as K
from lmforge.processes import free_port
from store.db import session_scope
from store.models import Job
from store.progress import claim_job, record_checkpoint
from store.settings import Settings
from tests.api.conftest import RecordingEnqueuer, authorize, bearer, small_spec

Factory = sessionmaker[Session]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Small limits, and an inference server URL where nothing listens."""
    return Settings(
        LMFORGE_HOME=tmp_path / "home",
        DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
        LMFORGE_INFERENCE_URL=f"http://127.0.0.1:{free_port()}",
        LMFORGE_INFERENCE_MAX_PROMPT_CHARS=20,
        LMFORGE_INFERENCE_MAX_TEXT_CHARS=30,
        LMFORGE_INFERENCE_MAX_NEW_TOKENS=50,
        LMFORGE_INFERENCE_MAX_SAMPLES=3,
        LMFORGE_INFERENCE_MAX_TEXTS=2,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    app.dependency_overrides[get_enqueuer] = RecordingEnqueuer
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c)
        yield c


def _factory(client: TestClient) -> Factory:
    factory: Factory = client.app.state.session_factory  # type: ignore[attr-defined]
    return factory


def _job(client: TestClient, dataset_id: str, checkpoint: bool = True, task: str | None = None
         ) -> str:
    """A job of ``tester``; with a ``best`` checkpoint row and blob (not a real model: these
    tests never reach a model) when ``checkpoint``."""
    job_id = str(client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"])
    factory = _factory(client)
    if task is not None:
        with session_scope(factory) as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.spec = {**job.spec, "task": task}
    if checkpoint:
        with session_scope(factory) as s:
            claim_job(s, job_id, "w1")
        storage = client.app.state.storage  # type: ignore[attr-defined]
        with session_scope(factory) as s:
            record_checkpoint(s, storage, job_id, 1, CheckpointBlob(K.BEST, 4, b"weights", {}), 3)
    return job_id


def _error(r: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code, err
    if field is not None:
        assert err["field"] == field, err
    return err


def test_the_routes_need_an_api_key(client: TestClient, dataset_id: str) -> None:
    job_id = _job(client, dataset_id)
    for route in ("generate", "score", "classify"):
        r = client.post(f"/v1/jobs/{job_id}/{route}", json={}, headers={"Authorization": ""})
        _error(r, 401, "unauthorized")


def test_another_principals_job_is_not_found(client: TestClient, dataset_id: str,
                                             make_key: Any) -> None:
    job_id = _job(client, dataset_id)
    other = bearer(make_key("other"))
    for route, body in (("generate", {}), ("score", {"text": "ab"}),
                        ("classify", {"texts": ["ab"]})):
        _error(client.post(f"/v1/jobs/{job_id}/{route}", json=body, headers=other), 404,
               "not_found")
    _error(client.post("/v1/jobs/job_00000000000000000000000000000000/generate", json={}),
           404, "not_found")


def test_a_job_without_the_checkpoint_asked_for_is_409(client: TestClient,
                                                       dataset_id: str) -> None:
    job_id = _job(client, dataset_id, checkpoint=False)
    err = _error(client.post(f"/v1/jobs/{job_id}/generate", json={}), 409, "no_checkpoint",
                 "checkpoint")
    assert "no best checkpoint yet" in err["message"] and "queued" in err["message"]
    _error(client.post(f"/v1/jobs/{job_id}/score", json={"text": "ab", "checkpoint": "last"}),
           409, "no_checkpoint", "checkpoint")
    job_with = _job(client, dataset_id)
    _error(client.post(f"/v1/jobs/{job_with}/generate", json={"checkpoint": "last"}), 409,
           "no_checkpoint")
    _error(client.post(f"/v1/jobs/{job_with}/generate",
                       json={"checkpoint": "ckpt_00000000000000000000000000000000"}),
           404, "not_found", "checkpoint")
    _error(client.post(f"/v1/jobs/{job_with}/generate", json={"checkpoint": "newest"}), 422,
           "validation_error", "checkpoint")


def test_the_task_must_fit_the_route(client: TestClient, dataset_id: str) -> None:
    lm = _job(client, dataset_id)
    err = _error(client.post(f"/v1/jobs/{lm}/classify", json={"texts": ["ab"]}), 409,
                 "wrong_task", "task")
    assert "'lm'" in err["message"] and "generate and score" in err["message"]
    clf = _job(client, dataset_id, task="classify")
    for route, body in (("generate", {}), ("score", {"text": "ab"})):
        err = _error(client.post(f"/v1/jobs/{clf}/{route}", json=body), 409, "wrong_task",
                     "task")
        assert "'classify'" in err["message"]


@pytest.mark.parametrize(("route", "body", "field"), [
    ("generate", {"prompt": "x" * 21}, "prompt"),
    ("generate", {"max_new_tokens": 51}, "max_new_tokens"),
    ("generate", {"num_samples": 4}, "num_samples"),
    ("score", {"text": "x" * 31}, "text"),
    ("classify", {"texts": ["a", "b", "c"]}, "texts"),
    ("classify", {"texts": ["a", "x" * 31]}, "texts.1"),
])
def test_requests_past_the_limits_are_422_naming_the_field(
        client: TestClient, dataset_id: str, route: str, body: dict[str, Any], field: str
) -> None:
    job_id = _job(client, dataset_id, task="classify" if route == "classify" else None)
    err = _error(client.post(f"/v1/jobs/{job_id}/{route}", json=body), 422,
                 "validation_error", field)
    assert "over the limit" in err["message"] and "LMFORGE_INFERENCE_MAX_" in err["message"]


@pytest.mark.parametrize(("body", "field"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"num_samples": 0}, "num_samples"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"unknown": 1}, "unknown"),
])
def test_invalid_sampling_parameters_are_422(client: TestClient, dataset_id: str,
                                             body: dict[str, Any], field: str) -> None:
    job_id = _job(client, dataset_id)
    # json.dumps escapes a lone surrogate as \ud800 (valid JSON, invalid Unicode).
    r = client.post(f"/v1/jobs/{job_id}/generate", content=json.dumps(body),
                    headers={"Content-Type": "application/json"})
    _error(r, 422, "validation_error", field)


def test_an_unreachable_inference_server_is_503(client: TestClient, dataset_id: str) -> None:
    job_id = _job(client, dataset_id)
    err = _error(client.post(f"/v1/jobs/{job_id}/generate", json={"prompt": "a"}), 503,
                 "inference_unavailable")
    assert "lmforge serve" in err["message"]
    _error(client.post(f"/v1/jobs/{job_id}/score", json={"text": "ab"}), 503,
           "inference_unavailable")
