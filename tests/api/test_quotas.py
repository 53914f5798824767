"""Quotas and resource limits (app.quotas, docs/security.md "Quotas and resource limits"):
each gives its documented status and code, and a refused upload leaves nothing stored.

A real app on a real SQLite file; the rate limit counts in a real Redis (the session's
``redis_url``)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.auth import Principal
from app.deps import get_enqueuer
from app.main import create_app
from app.quotas import QuotaExceeded, stream_slot
from store.models import Dataset, Job, JobStatus
from store.settings import Settings
from tests.api.conftest import CORPUS, RecordingEnqueuer, authorize, small_spec, upload


@contextmanager
def service(tmp_path: Path, **env: Any) -> Iterator[TestClient]:
    """A client of an API configured with ``env`` (settings by their environment names) that
    sends a key of a fresh non-admin principal."""
    settings = Settings(LMFORGE_HOME=tmp_path / "home",
                        DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
                        LMFORGE_MAX_UPLOAD_BYTES=64 * 1024, **env)
    app = create_app(settings)
    app.dependency_overrides[get_enqueuer] = RecordingEnqueuer
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c, f"user-{uuid.uuid4().hex[:8]}")
        yield c


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code, err
    return err


def _count(client: TestClient, model: Any) -> int:
    with client.app.state.session_factory() as s:  # type: ignore[attr-defined]
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _stored_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "home" / "storage"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# -- the size of a job ------------------------------------------------------------------------


def test_a_model_with_billions_of_parameters_is_422_job_too_large_with_the_numbers(
    client: TestClient, dataset_id: str,
) -> None:
    spec = small_spec(dataset_id)
    spec["model"] = {"embed_dim": 8192, "hidden_dim": 8192, "num_layers": 16}
    err = _error(client.post("/v1/jobs", json=spec), 422, "job_too_large")
    d = err["details"][0]
    assert d["parameters"] > 8_000_000_000 and d["max_parameters"] == 200_000_000
    assert f"{d['parameters']:,}" in err["message"] and "LMFORGE_MAX_PARAMS" in err["message"]
    assert err["field"] == "model.hidden_dim"
    assert client.get("/v1/jobs").json()["data"] == []  # nothing recorded


def test_training_memory_over_the_device_class_limit_is_422_with_the_numbers(
    tmp_path: Path,
) -> None:
    with service(tmp_path, LMFORGE_MAX_TRAIN_MEMORY_BYTES_CPU=200_000,
                 LMFORGE_MAX_TRAIN_MEMORY_BYTES_CUDA=10**12) as c:
        ds = upload(c).json()["id"]
        # 16 x 32 positions: the logits of the corpus's 29-token vocabulary (<unk> and its 28
        # distinct characters, from the dataset's statistics) alone take 16 x 32 x 29 x 12
        # bytes = 178 KB.
        big = {**small_spec(ds), "training": {"batch_size": 16, "seq_len": 32,
                                              "device": "cpu"}}
        err = _error(c.post("/v1/jobs", json=big), 422, "job_too_large")
        d = err["details"][0]
        assert d["device_class"] == "cpu" and d["max_train_memory_bytes"] == 200_000
        assert d["vocab_size_bound"] == 29
        assert d["train_memory_bytes"] > 16 * 32 * 29 * 12
        assert f"{d['train_memory_bytes']:,} bytes" in err["message"]
        assert err["field"] == "training.batch_size"
        # The same job fits the CUDA limit; "auto" may land on the CPU, so it must fit both.
        big["training"]["device"] = "cuda"
        assert c.post("/v1/jobs", json=big).status_code == 201
        big["training"]["device"] = "auto"
        assert _error(c.post("/v1/jobs", json=big), 422,
                      "job_too_large")["details"][0]["device_class"] == "auto"


def test_an_unbounded_word_vocabulary_counts_as_every_word_until_max_vocab_bounds_it(
    tmp_path: Path,
) -> None:
    # embed 8, hidden 8: 722 x (8 + 8 + 1) + 576 = 12,850 parameters with 722 words; 2,276
    # with 100.
    with service(tmp_path, LMFORGE_MAX_PARAMS=10_000) as c:
        ds = upload(c).json()["id"]  # 720 words, 8 distinct
        spec = {**small_spec(ds), "tokenizer": {"kind": "word"},
                "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1}}
        # With the dataset's statistics the vocabulary is exact: <unk>, <eos> and 8 words.
        r = c.post("/v1/jobs?dry_run=true", json=spec)
        assert r.status_code == 200 and r.json()["vocab_size"]["size"] == 10, r.text
        # A row without statistics (uploaded before they were counted): the bound is 722.
        with c.app.state.session_factory() as s:  # type: ignore[attr-defined]
            s.execute(update(Dataset).where(Dataset.id == ds).values(stats=None))
            s.commit()
        err = _error(c.post("/v1/jobs", json=spec), 422, "job_too_large")
        assert err["details"][0]["vocab_size_bound"] == 722
        assert "tokenizer.max_vocab" in err["message"]
        spec["tokenizer"]["max_vocab"] = 100
        assert c.post("/v1/jobs", json=spec).status_code == 201


def test_evaluation_tokens_over_the_service_limit_is_422_eval_too_large(tmp_path: Path) -> None:
    with service(tmp_path, LMFORGE_MAX_EVAL_TOKENS=100) as c:
        ds = upload(c).json()["id"]  # 3520 chars: a validation split of 352 char tokens
        err = _error(c.post("/v1/jobs", json=small_spec(ds, eval_tokens=None)), 422,
                     "eval_too_large")
        assert err["field"] == "training.eval_tokens"
        assert err["details"] == [{"eval_tokens": 352, "max_eval_tokens": 100}]
        r = c.post("/v1/jobs", json=small_spec(ds, eval_tokens=100))
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["training"]["eval_tokens"] == 100


def test_the_default_spec_evaluates_at_most_a_million_tokens(client: TestClient,
                                                             dataset_id: str) -> None:
    r = client.post("/v1/jobs", json=small_spec(dataset_id))
    assert r.json()["spec"]["training"]["eval_tokens"] == 1_000_000


# -- per-principal quotas ---------------------------------------------------------------------


def test_the_queued_job_quota_is_429_quota_exceeded(tmp_path: Path) -> None:
    with service(tmp_path, LMFORGE_QUOTA_QUEUED_JOBS=2, LMFORGE_QUOTA_RUNNING_JOBS=1) as c:
        ds = upload(c).json()["id"]
        first = c.post("/v1/jobs", json=small_spec(ds)).json()["id"]
        assert c.post("/v1/jobs", json=small_spec(ds)).status_code == 201
        err = _error(c.post("/v1/jobs", json=small_spec(ds)), 429, "quota_exceeded")
        assert err["details"] == [{"quota": "queued_jobs", "limit": 2, "current": 2}]
        # One of them runs: the queued quota has room again (the running quota is the
        # worker's: extra jobs wait queued, see tests/test_execution.py).
        with c.app.state.session_factory() as s:  # type: ignore[attr-defined]
            s.execute(update(Job).where(Job.id == first).values(status=JobStatus.RUNNING))
            s.commit()
        assert c.post("/v1/jobs", json=small_spec(ds)).status_code == 201
        assert _count(c, Job) == 3
        # Another principal has its own quota.
        authorize(c, "someone-else")
        ds2 = upload(c).json()["id"]
        assert c.post("/v1/jobs", json=small_spec(ds2)).status_code == 201


def test_admins_are_exempt_from_job_quotas(tmp_path: Path) -> None:
    with service(tmp_path, LMFORGE_QUOTA_QUEUED_JOBS=1) as c:
        authorize(c, "root", admin=True)
        ds = upload(c).json()["id"]
        for _ in range(3):
            assert c.post("/v1/jobs", json=small_spec(ds)).status_code == 201


def test_dataset_bytes_quota_is_409_and_leaves_nothing_stored(tmp_path: Path) -> None:
    size = len(CORPUS.encode())
    with service(tmp_path, LMFORGE_QUOTA_DATASET_BYTES=size + 100) as c:
        assert upload(c).status_code == 201
        err = _error(upload(c), 409, "quota_exceeded")
        assert err["details"] == [{"quota": "dataset_bytes", "limit": size + 100,
                                   "current": size, "requested": size}]
        assert "LMFORGE_QUOTA_DATASET_BYTES" in err["message"]
        assert _count(c, Dataset) == 1 and len(_stored_files(tmp_path)) == 1
        # A small one still fits; then the quota is full and any upload is refused up front.
        assert upload(c, "x" * 100).status_code == 201
        err = _error(upload(c, "y"), 409, "quota_exceeded")
        assert err["details"][0]["current"] == size + 100
        assert _count(c, Dataset) == 2 and len(_stored_files(tmp_path)) == 2


def test_stream_slots_are_capped_per_principal() -> None:
    settings = Settings(LMFORGE_QUOTA_STREAMS=2)
    alice = Principal(id="alice", name="alice", is_admin=False)
    bob = Principal(id="bob", name="bob", is_admin=False)
    with stream_slot(alice, settings), stream_slot(alice, settings), stream_slot(bob, settings):
        with pytest.raises(QuotaExceeded) as caught, stream_slot(alice, settings):
            pass
        assert caught.value.status_code == 429
        assert caught.value.details == [{"quota": "streams", "limit": 2, "current": 2}]
    with stream_slot(alice, settings), stream_slot(alice, settings):  # released again
        pass


# -- request rate -----------------------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after_counted_in_redis(tmp_path: Path,
                                                             redis_url: str) -> None:
    with service(tmp_path, REDIS_URL=redis_url, LMFORGE_RATE_LIMIT_PER_MINUTE=3) as c:
        # 7 requests span at most one window boundary, so at most 6 pass.
        answers = [c.get("/v1/jobs") for _ in range(7)]
        limited = [r for r in answers if r.status_code == 429]
        assert limited and all(r.status_code in (200, 429) for r in answers)
        err = _error(limited[0], 429, "rate_limited")
        assert 1 <= int(limited[0].headers["Retry-After"]) <= 60
        assert err["details"][0]["limit"] == 3
        assert c.get("/healthz").status_code == 200  # not rate limited


def test_a_second_api_process_shares_the_count(tmp_path: Path, redis_url: str) -> None:
    env = {"REDIS_URL": redis_url, "LMFORGE_RATE_LIMIT_PER_MINUTE": 3}
    with service(tmp_path / "a", **env) as a, service(tmp_path / "b", **env) as b:
        b.headers["Authorization"] = a.headers["Authorization"]
        # b's database does not know a's key: give b the same principal name instead.
        name = "shared-" + uuid.uuid4().hex[:8]
        authorize(a, name)
        authorize(b, name)
        statuses = [(a if i % 2 else b).get("/v1/jobs").status_code for i in range(7)]
        assert 429 in statuses


def test_rate_limit_fails_open_when_redis_is_unreachable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.quotas"), \
            service(tmp_path, REDIS_URL="redis://127.0.0.1:9/0",
                    LMFORGE_RATE_LIMIT_PER_MINUTE=1) as c:
        assert [c.get("/v1/jobs").status_code for _ in range(3)] == [200, 200, 200]
    assert any("rate limit not enforced" in r.getMessage() for r in caplog.records)


# -- request bodies ---------------------------------------------------------------------------


def _unknown_keys_body(n: int) -> bytes:
    return json.dumps({f"unknown_key_{i:07d}": 0 for i in range(n)}).encode()


def test_a_json_body_over_the_limit_is_413_before_parsing(client: TestClient) -> None:
    body = _unknown_keys_body(1_000_000)  # about 23 MB, a million unknown keys
    assert len(body) > 16 * 1024 * 1024
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    err = _error(r, 413, "payload_too_large")
    assert err["details"] == [{"limit_bytes": 1024 * 1024}]
    assert len(r.content) < 1000
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_chunked_body_without_content_length_is_counted(client: TestClient) -> None:
    chunk = b" " * 65536

    def stream() -> Iterator[bytes]:
        yield b"{"
        for _ in range(20):  # 1.25 MiB of whitespace
            yield chunk
        yield b"}"

    r = client.post("/v1/jobs", content=stream(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _error(r, 413, "payload_too_large")


def test_validation_errors_are_bounded_in_number_and_size(client: TestClient,
                                                         dataset_id: str) -> None:
    spec: dict[str, Any] = json.loads(_unknown_keys_body(40_000))  # ~0.9 MB: under the limit
    spec["dataset_id"] = dataset_id
    spec["k" * 5000] = 1  # a huge key: its field is cut
    body = json.dumps(spec).encode()
    assert len(body) < 1024 * 1024
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    err = _error(r, 422, "validation_error")
    assert len(err["details"]) == 10
    assert "more errors not shown" in err["message"]
    assert len(r.content) < 10_000
    assert all(len(d["field"] or "") <= 203 for d in err["details"])
    assert client.get("/healthz").status_code == 200


def test_the_json_body_limit_is_configurable(tmp_path: Path) -> None:
    with service(tmp_path, LMFORGE_MAX_JSON_BODY_BYTES=100) as c:
        ds = upload(c).json()["id"]  # uploads are not JSON bodies: their own cap applies
        r = c.post("/v1/jobs", json={**small_spec(ds), "name": "n" * 100})
        assert _error(r, 413, "payload_too_large")["details"] == [{"limit_bytes": 100}]


# -- uploads ----------------------------------------------------------------------------------


def test_an_oversized_upload_is_413_and_leaves_nothing_stored(client: TestClient,
                                                              tmp_path: Path) -> None:
    r = upload(client, "a" * (64 * 1024 + 1))
    assert _error(r, 413, "payload_too_large")
    assert _count(client, Dataset) == 0 and _stored_files(tmp_path) == []
    # Without a Content-Length the stream is cut at the cap: the same answer, nothing stored.
    boundary = "B0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.txt\"\r\nContent-Type: text/plain\r\n\r\n").encode()

    def stream() -> Iterator[bytes]:
        yield head
        for _ in range(5):
            yield b"b" * 20_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/datasets", content=stream(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    _error(r, 413, "payload_too_large")
    assert _count(client, Dataset) == 0 and _stored_files(tmp_path) == []


def test_a_non_utf8_upload_is_422_naming_the_byte_offset_and_leaves_nothing_stored(
    client: TestClient, tmp_path: Path,
) -> None:
    data = "héllo wörld\n".encode() * 10 + b"\xff rest"
    err = _error(upload(client, data), 422, "validation_error")
    offset = len("héllo wörld\n".encode()) * 10
    assert err["field"] == "file" and err["details"][0]["byte_offset"] == offset
    assert f"byte offset {offset}" in err["message"]
    assert _count(client, Dataset) == 0 and _stored_files(tmp_path) == []


def test_page_sizes_are_capped(client: TestClient) -> None:
    for path, cap in (("/v1/jobs", 500), ("/v1/datasets", 500)):
        assert client.get(path, params={"limit": cap}).status_code == 200
        _error(client.get(path, params={"limit": cap + 1}), 422, "validation_error")
