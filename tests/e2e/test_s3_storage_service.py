"""The service on S3 storage, end to end: a real API and Celery worker (tests/conftest.py
``start_service``) with ``LMFORGE_STORAGE_URL=s3://BUCKET/lmforge`` on a real moto server
process. A dataset is uploaded, a tiny job trains to success, and its checkpoint is downloaded
through the API (streamed from the bucket, whole and by range) and through a second API process
sharing only the database and the bucket, which answers with a presigned URL (307) that the
Python client follows. Every blob is in the bucket and none under the service's LMFORGE_HOME."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from lmforge.client import Client
from store.settings import Settings
from tests.support.jobenv import corpus_text
from tests.support.s3 import MotoServer, make_bucket, s3_client, s3_env
from tests.support.uvicorn_thread import ThreadedServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TINY = {
    "name": "s3-tiny",
    "tokenizer": {"kind": "char"},
    "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, "dropout": 0.0},
    "training": {"batch_size": 8, "seq_len": 16, "seed": 0, "device": "cpu", "num_threads": 1,
                 "max_steps": 30, "eval_interval": 15},
}


def _wait_finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 240  # a safety net: pytest-timeout fails the test first
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish")


def test_a_job_on_s3_storage_trains_and_its_checkpoint_downloads(
    start_service: Callable[..., Any], s3_server: MotoServer, sqlite_url: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = make_bucket(s3_server)
    env = s3_env(s3_server, bucket)  # prefix "lmforge"
    svc = start_service(sqlite_url, name="s3", extra_env=env)
    try:
        text = corpus_text()[:8000].encode()
        r = svc.client.post("/v1/datasets", files={"file": ("corpus.txt", text, "text/plain")},
                            data={"name": "corpus"})
        assert r.status_code == 201, r.text
        dataset = r.json()
        r = svc.client.post("/v1/jobs", json={**TINY, "dataset_id": dataset["id"]})
        assert r.status_code == 201, r.text
        job = _wait_finished(svc.client, r.json()["id"])
        assert job["status"] == "succeeded", (job, svc.log_tail())
        ckpts = svc.client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        best = next(c for c in ckpts if c["kind"] == "best")
        url = f"/v1/jobs/{job['id']}/checkpoints/{best['id']}/download"

        # Streamed by the API from the bucket: whole, and one range.
        r = svc.client.get(url)
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == best["sha256"]
        assert r.headers["x-checkpoint-sha256"] == best["sha256"]
        assert len(r.content) == best["bytes"]
        part = svc.client.get(url, headers={"Range": "bytes=100-199"})
        assert (part.status_code, part.content) == (206, r.content[100:200])
        assert svc.client.get(url, headers={"If-None-Match": r.headers["etag"]}
                              ).status_code == 304

        # The blobs are objects in the bucket, with their sha256 recorded; none is local.
        s3 = s3_client(s3_server)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert f"lmforge/datasets/{dataset['id']}.txt" in keys
        ckpt_keys = {k for k in keys if k.startswith(f"lmforge/checkpoints/{job['id']}/")}
        assert len(ckpt_keys) >= len(ckpts) >= 2
        for c in ckpts:
            key = next(k for k in ckpt_keys if c["id"] in k)
            assert s3.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == c["sha256"]
        assert not (svc.home / "storage").exists()
        assert not [p for p in svc.home.rglob("*")
                    if p.suffix in (".safetensors", ".txt") and p.is_file()]

        # A second API process that shares only the database and the bucket (another
        # machine's), with presigned downloads: 307 to the store, followed by the client.
        for name, value in {**env, "DATABASE_URL": sqlite_url, "REDIS_URL": svc.redis_url,
                            "LMFORGE_HOME": str(tmp_path / "other-api"),
                            "LMFORGE_DOWNLOAD_PRESIGN_S": "60"}.items():
            monkeypatch.setenv(name, value)
        with ThreadedServer(create_app(Settings())) as other:
            r = httpx.get(f"{other.url}{url}", headers={"Authorization": f"Bearer {svc.key}"})
            assert r.status_code == 307, r.text
            location = r.headers["location"]
            assert location.startswith(s3_server.endpoint_url)
            direct = httpx.get(location)  # no credentials: the signature is the grant
            assert direct.status_code == 200
            assert hashlib.sha256(direct.content).hexdigest() == best["sha256"]
            with Client(other.url, svc.key) as lm:
                path = lm.checkpoints.download(job["id"], "best", tmp_path / "best.safetensors")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == best["sha256"]
        assert not (tmp_path / "other-api" / "storage").exists()
    finally:
        svc.stop()
