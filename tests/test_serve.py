"""The inference server (worker.serve) in-process: its LRU cache of loaded checkpoints keyed
by sha256, the checks of the blob it reads from storage, the deadline, concurrent requests,
and the error shape the API passes through. Real checkpoints from a tiny real training run,
real files in a LocalStorage under tmp_path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.contract import CorpusTexts
from core.corpora import builtin_corpus
from store.settings import Settings
from store.storage import LocalStorage
from tests.engine.conftest import RecordingHooks, make_spec
from worker.engine.trainer import train
from worker.serve.app import create_app


@pytest.fixture(scope="module")
def blobs() -> dict[str, bytes]:
    """A best and a last checkpoint of one tiny char job."""
    hooks = RecordingHooks()
    train(make_spec(max_steps=6, eval_interval=3), CorpusTexts(train=builtin_corpus(
        "python-docs")[:20_000]), hooks)
    return {"best": hooks.last("best").data, "last": hooks.last("last").data}


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def client(tmp_path: Path, storage: LocalStorage) -> Iterator[TestClient]:
    settings = Settings(LMFORGE_HOME=tmp_path, LMFORGE_INFERENCE_CACHE_MODELS=1,
                        LMFORGE_INFERENCE_DEVICE="cpu")
    with TestClient(create_app(settings, storage), raise_server_exceptions=False) as c:
        yield c


def _ref(storage: LocalStorage, name: str, data: bytes) -> dict[str, str]:
    key = f"checkpoints/job_x/{name}.safetensors"
    storage.put_bytes(key, data)
    return {"id": f"ckpt_{name}", "storage_key": key, "sha256": hashlib.sha256(data).hexdigest()}


def _gen(client: TestClient, ref: dict[str, str], **body: Any) -> Any:
    return client.post("/generate", json={"checkpoint": ref, "deadline_s": 60, "prompt": "de",
                                          "max_new_tokens": 5, **body})


def test_the_cache_keeps_the_most_recently_used_checkpoints(
        client: TestClient, storage: LocalStorage, blobs: dict[str, bytes]) -> None:
    cache = client.app.state.inference.cache  # type: ignore[attr-defined]
    best, last = _ref(storage, "best", blobs["best"]), _ref(storage, "last", blobs["last"])
    for ref in (best, best, last, last, best):
        r = _gen(client, ref)
        assert r.status_code == 200, r.text
        assert r.json()["checkpoint_id"] == ref["id"]
    # Size 1: best loaded, hit, evicted by last, hit, loaded again.
    assert cache.loads == 3
    assert cache.keys() == [best["sha256"]]


def test_a_blob_that_fails_its_sha256_or_is_missing_is_503(
        client: TestClient, storage: LocalStorage, blobs: dict[str, bytes]) -> None:
    ref = _ref(storage, "best", blobs["best"])
    storage.put_bytes(ref["storage_key"], blobs["best"][:-1] + b"\0")
    r = _gen(client, ref)
    assert r.status_code == 503 and r.json()["error"]["code"] == "checkpoint_corrupt", r.text
    r = _gen(client, {**ref, "storage_key": "checkpoints/job_x/gone.safetensors"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "blob_missing", r.text


def test_a_deadline_that_has_passed_is_504_and_the_server_keeps_serving(
        client: TestClient, storage: LocalStorage, blobs: dict[str, bytes]) -> None:
    ref = _ref(storage, "best", blobs["best"])
    r = _gen(client, ref, deadline_s=1e-9, max_new_tokens=100)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert "1e-09 s" in r.json()["error"]["message"]
    assert _gen(client, ref).status_code == 200  # the compute lock was released


def test_concurrent_requests_each_get_their_own_answer(
        client: TestClient, storage: LocalStorage, blobs: dict[str, bytes]) -> None:
    ref = _ref(storage, "best", blobs["best"])
    seeds = list(range(8))
    alone = [_gen(client, ref, seed=s, max_new_tokens=20).json()["samples"] for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(
            lambda s: _gen(client, ref, seed=s, max_new_tokens=20).json()["samples"], seeds))
    assert together == alone


def test_invalid_calls_are_422_in_the_error_shape(
        client: TestClient, storage: LocalStorage, blobs: dict[str, bytes]) -> None:
    ref = _ref(storage, "best", blobs["best"])
    r = _gen(client, ref, top_p=2)
    assert r.status_code == 422 and r.json()["error"]["field"] == "top_p", r.text
    r = client.post("/score", json={"checkpoint": ref, "deadline_s": 5, "text": "d"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "text", r.text
    r = client.post("/score", json={"checkpoint": {**ref, "sha256": "x"}, "deadline_s": 5,
                                    "text": "de"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "checkpoint.sha256", r.text


def test_health_names_the_device(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["device"] == "cpu"
