"""Helpers for the end-to-end tests: a thin client over the real service's HTTP API."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.corpora import find_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = find_corpus("tinyshakespeare/input.txt")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# Safety nets for polling, not assertions about speed: a test fails at its pytest-timeout first.
WAIT_TIMEOUT_S = 150.0

# Small enough that 200 steps take seconds on 2 CPU cores, big enough to learn something.
SMALL_MODEL = {"embed_dim": 32, "hidden_dim": 64, "num_layers": 1, "dropout": 0.0}
SMALL_TRAINING = {"batch_size": 16, "seq_len": 32, "seed": 0, "device": "cpu", "num_threads": 1}


# The line `lmforge up` prints with the first admin key it creates.
ADMIN_KEY_LINE = re.compile(r"^Admin API key \(shown only this once.*: (lmf_[A-Za-z0-9]+)$",
                            re.MULTILINE)


def printed_admin_keys(log: str) -> list[str]:
    """The admin keys that `lmforge up` printed in ``log``."""
    return ADMIN_KEY_LINE.findall(log)


def wait_for_admin_key(read_log: Callable[[], str], alive: Callable[[], bool]) -> str:
    """The admin key `lmforge up` prints right after it is healthy (polls ``read_log``)."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        keys = printed_admin_keys(read_log())
        if keys:
            return keys[0]
        assert alive(), read_log()
        time.sleep(0.1)
    pytest.fail(f"lmforge up printed no admin key:\n{read_log()}")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Api:
    """The service's HTTP API, with the polling the tests need."""

    def __init__(self, service: Any, data: dict[str, Any]) -> None:
        self.service = service
        self.client = service.client
        self.data = data  # {"dataset_id": ...} or {"dataset": {"builtin": ...}}

    def spec(self, **overrides: Any) -> dict[str, Any]:
        base = {
            "name": "e2e",
            **self.data,
            "tokenizer": {"kind": "char"},
            "model": SMALL_MODEL,
            "training": {**SMALL_TRAINING, "max_steps": 200, "eval_interval": 50},
        }
        return deep_merge(base, overrides)

    def submit(self, **overrides: Any) -> dict[str, Any]:
        response = self.client.post("/v1/jobs", json=self.spec(**overrides))
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
        return job

    def submit_long(self) -> dict[str, Any]:
        """A job that runs until cancelled (no evaluation until its far-away end)."""
        return self.submit(
            name="e2e-long",
            training={"max_steps": 1_000_000, "eval_interval": 1_000_000, "log_interval": 5},
        )

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, job_id: str, what: str, predicate: Any) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            job = self.job(job_id)
            if predicate(job):
                return job
            if job["status"] in TERMINAL:
                pytest.fail(f"job {job_id} ended {job['status']} ({job['error']}) before {what}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} not {what} after {WAIT_TIMEOUT_S:.0f} s: {job}")
            time.sleep(0.2)

    def wait_finished(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} not finished after {WAIT_TIMEOUT_S:.0f} s: {job}")
            time.sleep(0.2)

    def wait_running(self, job_id: str) -> dict[str, Any]:
        """Until the job runs and has reported at least one step."""
        return self.wait(
            job_id,
            "running",
            lambda j: j["status"] == "running" and j["progress"]["step"] >= 1,
        )

    def cancel(self, job_id: str) -> dict[str, Any]:
        response = self.client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202, response.text
        return dict(response.json())

    def metrics(self, job_id: str, page_size: int = 64) -> list[dict[str, Any]]:
        """Every metric row, read page by page with ``after_step``."""
        rows: list[dict[str, Any]] = []
        after = 0
        while True:
            response = self.client.get(
                f"/v1/jobs/{job_id}/metrics", params={"after_step": after, "limit": page_size}
            )
            assert response.status_code == 200, response.text
            page = response.json()
            rows.extend(page["data"])
            if not page["has_more"]:
                return rows
            assert page["data"], "has_more without rows"
            after = page["data"][-1]["step"]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/v1/jobs/{job_id}/checkpoints")
        assert response.status_code == 200, response.text
        return list(response.json()["data"])


@pytest.fixture(scope="session")
def data_source(service: Any) -> dict[str, Any]:
    """tinyshakespeare uploaded to the service, or the built-in corpus when it is absent."""
    if SHAKESPEARE is None:
        return {"dataset": {"builtin": "python-docs"}}
    with SHAKESPEARE.open("rb") as f:
        response = service.client.post(
            "/v1/datasets",
            files={"file": ("input.txt", f, "text/plain")},
            data={"name": "tinyshakespeare"},
        )
    assert response.status_code == 201, response.text
    return {"dataset_id": response.json()["id"]}


@pytest.fixture(scope="session")
def api(service: Any, data_source: dict[str, Any]) -> Api:
    return Api(service, data_source)
