"""Export and the dry run through real processes: the API, a Celery worker that trains a small
job, and the inference server (``lmforge serve``) that builds the exported files and times
the calibration steps."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lmforge
from tests.e2e.conftest import Api
from worker.engine.sample import sample

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DATA = {"dataset": {"builtin": "python-docs"}}


@pytest.fixture(scope="module")
def svc(start_service: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('export-db') / 'lmforge.db'}"
    service = start_service(url, name="export", inference=True)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def job(svc: Any) -> dict[str, Any]:
    """A finished 2-layer char job with tied weights, and its checkpoints."""
    api = Api(svc, DATA)
    job_id = api.submit(name="export", model={"num_layers": 2, "embed_dim": 64,
                                              "tie_weights": True},
                        training={"max_steps": 30, "eval_interval": 10})["id"]
    finished = api.wait_finished(job_id)
    assert finished["status"] == "succeeded", finished
    return {"job": finished, "checkpoints": api.checkpoints(job_id)}


def _export(svc: Any, job_id: str, cid: str, fmt: str) -> bytes:
    r = svc.client.get(f"/v1/jobs/{job_id}/checkpoints/{cid}/export", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-export-sha256"] == hashlib.sha256(r.content).hexdigest()
    return r.content


def _download(svc: Any, job_id: str, cid: str) -> bytes:
    r = svc.client.get(f"/v1/jobs/{job_id}/checkpoints/{cid}/download")
    assert r.status_code == 200, r.text
    return r.content


def test_exported_safetensors_loads_and_samples_as_the_service(svc: Any, job: dict[str, Any],
                                                               tmp_path: Path) -> None:
    job_id = job["job"]["id"]
    best = [c for c in job["checkpoints"] if c["kind"] == "best"][-1]
    r = svc.client.get(f"/v1/jobs/{job_id}/checkpoints/best/export")  # safetensors by default
    assert r.status_code == 200, r.text
    name = f"{job_id}-best-step{best['step']}.safetensors"
    assert f'filename="{name}"' in r.headers["content-disposition"]
    path = tmp_path / name
    path.write_bytes(r.content)
    lm = lmforge.load(path)
    assert lm.metadata["format"] == "lmforge.model.v1" and lm.tokenizer.kind == "char"
    assert lm.metadata["checkpoint_kind"] == "best" and lm.metadata["step"] == str(best["step"])
    body = {"prompt": "def ", "max_new_tokens": 40, "temperature": 0.9, "top_k": 20, "seed": 5}
    served = svc.client.post(f"/v1/jobs/{job_id}/generate", json=body)
    assert served.status_code == 200, served.text
    text = lm.generate("def ", max_new_tokens=40, temperature=0.9, top_k=20, seed=5)
    assert text == served.json()["samples"][0]["text"]
    assert "def " + text == sample(_download(svc, job_id, best["id"]), "def ", 40, 0.9, 20, 5)
    scored = svc.client.post(f"/v1/jobs/{job_id}/score", json={"text": "def f(x):\n"}).json()
    assert lm.score("def f(x):\n")["loss"] == pytest.approx(scored["loss"], abs=1e-5)


def test_exported_onnx_gives_the_checkpoint_logits_in_onnxruntime(svc: Any, job: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    job_id = job["job"]["id"]
    last = [c for c in job["checkpoints"] if c["kind"] == "last"][-1]
    sess = ort.InferenceSession(_export(svc, job_id, last["id"], "onnx"),
                                providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["format"] == "lmforge.model.v1" and '"kind": "char"' in meta["tokenizer"]
    ckpt = tmp_path / "last.safetensors"
    ckpt.write_bytes(_download(svc, job_id, last["id"]))
    lm = lmforge.load(ckpt)  # a checkpoint loads too
    cfg = lm.config
    ids = torch.tensor([lm.tokenizer.encode("def main():\n    return 1\n"),
                        lm.tokenizer.encode("import os\nprint(os.sep) # x\n")[:25]])
    h = np.zeros((cfg["num_layers"], 2, cfg["hidden_dim"]), dtype=np.float32)
    c, state = h.copy(), None
    for chunk in (ids[:, :10], ids[:, 10:]):  # the second chunk from the carried state
        logits, h, c = sess.run(None, {"input_ids": chunk.numpy(), "h0": h, "c0": c})
        with torch.no_grad():
            want, state = lm.model(chunk, state)
        np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(h, state[0].numpy(), atol=1e-4, rtol=0)


def test_export_errors(svc: Any, job: dict[str, Any]) -> None:
    job_id = job["job"]["id"]
    base = f"/v1/jobs/{job_id}/checkpoints"
    r = svc.client.get(f"{base}/best/export", params={"format": "pt"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "format"
    r = svc.client.get(f"{base}/ckpt_{'0' * 32}/export", params={"format": "onnx"})
    assert r.status_code == 404
    r = svc.client.get(f"/v1/jobs/job_{'0' * 32}/checkpoints/best/export")
    assert r.status_code == 404
    r = svc.client.get(f"{base}/best/export", headers={"Authorization": "Bearer lmf_wrong"})
    assert r.status_code == 401


def test_dry_run_calibrates_on_the_inference_server(svc: Any) -> None:
    api = Api(svc, DATA)
    before = svc.client.get("/v1/jobs").json()["data"]
    spec = api.spec(name="dry", model={"hidden_dim": 48},
                    training={"max_steps": 700, "batch_size": 8, "seq_len": 24})
    r = svc.client.post("/v1/jobs?dry_run=true", json=spec)
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["warnings"] == []
    assert est["calibration"]["device"] == "cpu" and est["calibration"]["steps"] == 3
    assert est["calibration"]["cached"] is False
    sps = est["seconds_per_step"]
    assert sps > 0
    assert est["estimated_train_seconds"] == pytest.approx(sps * 700)
    assert est["calibration"]["tokens_per_s"] == pytest.approx(8 * 24 / sps)
    again = svc.client.post("/v1/jobs?dry_run=true", json=spec).json()  # remembered per shape
    assert again["calibration"]["cached"] is True and again["seconds_per_step"] == sps
    # A CUDA job is not timed on a CPU server: null, and the warning says why.
    cuda = svc.client.post("/v1/jobs?dry_run=true",
                           json=api.spec(training={"device": "cuda"})).json()
    if est["calibration"]["device"] == "cpu":
        assert cuda["seconds_per_step"] is None
        assert any("device_mismatch" in w for w in cuda["warnings"])
    assert svc.client.get("/v1/jobs").json()["data"] == before  # nothing created
