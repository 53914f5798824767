"""The submission check for ``bpe`` jobs: byte-level BPE makes at most one token per UTF-8
byte, so a training split whose bytes cannot fill one batch is a 422 before any worker runs.
A bound that suffices proves nothing: the worker then counts the real tokens
(tests/test_runner.py)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import upload


def _bpe_job(client: TestClient, text: str) -> Any:
    ds = upload(client, text).json()["id"]
    return client.post("/v1/jobs", json={"dataset_id": ds, "tokenizer": {"kind": "bpe"}})


def test_bpe_corpus_with_fewer_bytes_than_one_batch_is_422_with_the_bound(
    client: TestClient,
) -> None:
    r = _bpe_job(client, "a" * 1000)  # 900 train chars = 900 bytes < 32 x 65 = 2080
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "corpus_too_small"
    assert err["field"] == "training.batch_size"
    assert err["details"] == [{"split": "train", "tokens": 900, "needed": 2080,
                               "batch_size": 32, "seq_len": 64}]
    assert "at most 900 bpe tokens" in err["message"] and "2080" in err["message"]


def test_bpe_bound_counts_multibyte_characters_of_the_train_split_only(
    client: TestClient,
) -> None:
    # "é" is 2 bytes: 1000 chars = 2000 bytes; the held-out 100 chars take at least 100 of
    # them, so the 900 train chars hold at most 1900 bytes < 2080.
    r = _bpe_job(client, "é" * 1000)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"][0]["tokens"] == 1900


def test_bpe_corpus_whose_bound_fills_one_batch_is_accepted(client: TestClient) -> None:
    # 1200 x "é": 2400 bytes - 120 held-out chars = 2280 >= 2080. Whether the trained
    # vocabulary leaves enough tokens is the worker's check.
    assert _bpe_job(client, "é" * 1200).status_code == 201


def test_bpe_separate_validation_dataset_of_one_byte_is_422(client: TestClient) -> None:
    train = upload(client, "a" * 3000).json()["id"]
    val = upload(client, "b").json()["id"]
    r = client.post("/v1/jobs", json={"dataset_id": train, "validation": {"id": val},
                                       "tokenizer": {"kind": "bpe"}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == ("corpus_too_small", "validation")
    assert err["details"][0] == {"split": "validation", "tokens": 1, "needed": 2,
                                 "batch_size": 32, "seq_len": 64}


def test_bpe_job_on_the_builtin_corpus_is_accepted(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={"dataset": {"builtin": "python-docs"},
                                       "tokenizer": {"kind": "bpe"}})
    assert r.status_code == 201, r.text
