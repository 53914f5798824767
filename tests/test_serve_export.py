"""The inference server's /export and /calibrate (worker.serve.export_routes) in-process: real
checkpoints of a tiny real training run in a LocalStorage under tmp_path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load

from core.contract import CorpusTexts
from core.corpora import builtin_corpus
from store.settings import Settings
from store.storage import LocalStorage
from tests.engine.conftest import RecordingHooks, make_spec
from worker.engine.checkpoint import load_checkpoint, read_metadata
from worker.engine.export import to_safetensors
from worker.engine.trainer import train
from worker.serve.app import create_app


@pytest.fixture(scope="module")
def blob() -> bytes:
    hooks = RecordingHooks()
    train(make_spec(max_steps=4, eval_interval=2), CorpusTexts(train=builtin_corpus(
        "python-docs")[:20_000]), hooks)
    return hooks.last("last").data


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def client(tmp_path: Path, storage: LocalStorage) -> Iterator[TestClient]:
    settings = Settings(LMFORGE_HOME=tmp_path, LMFORGE_INFERENCE_DEVICE="cpu")
    with TestClient(create_app(settings, storage), raise_server_exceptions=False) as c:
        yield c


def _ref(storage: LocalStorage, data: bytes) -> dict[str, str]:
    key = "checkpoints/job_x/last.safetensors"
    storage.put_bytes(key, data)
    return {"id": "ckpt_x", "storage_key": key, "sha256": hashlib.sha256(data).hexdigest()}


def test_export_answers_the_file_and_its_sha256(client: TestClient, storage: LocalStorage,
                                                blob: bytes) -> None:
    ref = _ref(storage, blob)
    r = client.post("/export", json={"checkpoint": ref, "format": "safetensors",
                                     "deadline_s": 60})
    assert r.status_code == 200, r.text
    # The same tensors and metadata as the engine's export (safetensors keeps the metadata in
    # a hash map: its order in the header, and so the bytes, may differ between calls).
    want = to_safetensors(load_checkpoint(blob))
    assert st_load(r.content).keys() == st_load(want).keys()
    assert all(torch.equal(v, st_load(want)[k]) for k, v in st_load(r.content).items())
    assert read_metadata(r.content) == read_metadata(want)
    assert r.headers["x-export-sha256"] == hashlib.sha256(r.content).hexdigest()
    r = client.post("/export", json={"checkpoint": ref, "format": "onnx", "deadline_s": 60})
    assert r.status_code == 200, r.text
    assert {p.key for p in onnx.load_from_string(r.content).metadata_props} >= {
        "format", "model_config", "tokenizer"}
    r = client.post("/export", json={"checkpoint": ref, "format": "pt", "deadline_s": 60})
    assert r.status_code == 422 and r.json()["error"]["field"] == "format"


def _calibrate(client: TestClient, spec: Any, **body: Any) -> Any:
    return client.post("/calibrate", json={"spec": spec.model_dump(mode="json"),
                                           "vocab_size": 40, "deadline_s": 60, **body})


def test_calibrate_times_steps_once_per_shape(client: TestClient) -> None:
    spec = make_spec(batch_size=3, seq_len=5, model={"hidden_dim": 24})
    first = _calibrate(client, spec, steps=2)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["steps"] == 2 and out["device"] == "cpu" and out["cached"] is False
    assert out["seconds_per_step"] > 0
    # Another spec of the same shape (a name, a learning rate): the same answer, remembered.
    same = make_spec(batch_size=3, seq_len=5, model={"hidden_dim": 24},
                     optimizer={"lr": 0.5}, top={"name": "other"})
    again = _calibrate(client, same, steps=2).json()
    assert again == {**out, "cached": True}
    assert _calibrate(client, spec, vocab_size=41).json()["cached"] is False


def test_calibrate_refuses_another_device_class_and_a_shape_too_large(
        client: TestClient) -> None:
    r = _calibrate(client, make_spec(device="cuda"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "device_mismatch", r.text
    huge = make_spec(batch_size=4096, seq_len=4096)  # logits alone: 16.7M positions x vocab
    r = _calibrate(client, huge, vocab_size=50_000_000)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "calibration_too_large" and err["field"] == "training.batch_size"
