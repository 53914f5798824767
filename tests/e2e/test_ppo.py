"""PPO fine-tuning through the real service (issue 10): train a tiny character LM on uniformly
random letters, then a ``task: "ppo"`` job with ``init_from`` it and a ``char_fraction``
reward; watch its metrics and samples over HTTP, generate from and export its checkpoint;
stop its worker mid-run (SIGTERM: the job goes
back to queued with a ``last`` checkpoint) and let the next worker resume it, the metric rows
continuing without a gap or a change; and cancel another one while it runs."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import string
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lmforge.processes import spawn
from tests.e2e.conftest import Api

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MODEL = {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1}
CPU = {"device": "cpu", "num_threads": 1, "seed": 0}
PPO = {"reward": {"kind": "char_fraction", "target": "e"}, "response_length": 8,
       "rollout_batch_size": 8, "ppo_epochs": 2, "kl_coef": 0.05}
PPO_METRICS = ("reward_mean", "reward_std", "kl", "kl_exact", "entropy", "clip_fraction",
               "approx_kl", "policy_loss", "value_loss", "explained_variance",
               "response_length", "kl_coef")
# Far more iterations than run before the SIGTERM lands (the worker is stopped a few
# iterations in), few enough for the resumed run to finish in seconds.
MAX_STEPS = 300


def uniform_text(n_lines: int = 100, width: int = 200, seed: int = 0) -> str:
    """Independent uniform characters over a-z and space, in lines."""
    r = random.Random(seed)
    alphabet = string.ascii_lowercase + " "
    return "".join("".join(r.choice(alphabet) for _ in range(width)) + "\n"
                   for _ in range(n_lines))


@pytest.fixture(scope="module")
def svc(start_service: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ppo-db') / 'lmforge.db'}"
    service = start_service(url, name="ppo", inference=True)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def api(svc: Any) -> Api:
    return Api(svc, {})


@pytest.fixture(scope="module")
def lm_id(api: Api) -> str:
    """A succeeded character LM on uniform letters (the policy's start)."""
    r = api.client.post("/v1/datasets", files={"file": ("u.txt", uniform_text().encode(),
                                                        "text/plain")}, data={"name": "u"})
    assert r.status_code == 201, r.text
    job = api.client.post("/v1/jobs", json={
        "name": "uniform-lm", "dataset_id": r.json()["id"], "tokenizer": {"kind": "char"},
        "model": MODEL,
        "training": {**CPU, "batch_size": 16, "seq_len": 32, "max_steps": 30,
                     "eval_interval": 30}})
    assert job.status_code == 201, job.text
    done = api.wait_finished(job.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    return str(done["id"])


def submit_ppo(api: Api, lm: str, **training: Any) -> dict[str, Any]:
    r = api.client.post("/v1/jobs", json={
        "name": "ppo", "task": "ppo", "init_from": {"job_id": lm}, "ppo": PPO,
        "training": {**CPU, "log_interval": 1, **training}})
    assert r.status_code == 201, r.text
    return dict(r.json())


def samples(api: Api, job_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = 0
    while True:
        page = api.client.get(f"/v1/jobs/{job_id}/samples",
                              params={"after_step": after, "limit": 100})
        assert page.status_code == 200, page.text
        rows.extend(page.json()["data"])
        if not page.json()["has_more"]:
            return rows
        after = rows[-1]["step"]


def _start_worker(service: Any) -> None:
    """A new worker for ``service``, as the fixture starts it, logging to the same file."""
    env = {**os.environ, "LMFORGE_HOME": str(service.home),
           "DATABASE_URL": service.database_url, "REDIS_URL": service.redis_url,
           "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "lmforge.cli", "worker", "--concurrency", "1",
            "--hostname", f"{service.name}@%h"]
    with open(service.logs["worker"], "ab") as log:
        service.procs["worker"] = spawn(argv, env=env, log=log)


def test_a_ppo_job_reports_its_metrics_and_samples_and_resumes_after_a_worker_stop(
        api: Api, lm_id: str, procs: Any) -> None:
    job_id = submit_ppo(api, lm_id, max_steps=MAX_STEPS, eval_interval=4,
                        checkpoint_interval=1000)["id"]
    api.wait(job_id, "a few iterations in", lambda j: j["progress"]["step"] >= 5)

    rows = api.metrics(job_id)
    for row in rows:
        for name in PPO_METRICS:
            assert name in row, (name, row)
        assert row["kl_exact"] >= 0.0 and 0.0 <= row["reward_mean"] <= 1.0
        assert 0.0 <= row["clip_fraction"] <= 1.0
    latest = api.job(job_id)["latest_metrics"]
    assert latest is not None and "reward_mean" in latest

    stored = samples(api, job_id)
    assert stored, "no samples at the evaluation interval"
    assert [s["step"] % 4 for s in stored] == [0] * len(stored)
    for sample in stored[0]["samples"]:
        assert set(sample) >= {"prompt", "response", "reward"}
        assert sample["prompt"] == ""  # ppo.prompts: empty (the default)
        expected = sum(c == "e" for c in sample["response"]) / PPO["response_length"]
        assert sample["reward"] == pytest.approx(expected)

    # Stop the worker mid-run: a last checkpoint, back to queued, then the next worker resumes.
    service = api.service
    worker = service.procs["worker"]
    tree = procs.descendants(worker.pid)
    try:
        worker.send_signal(signal.SIGTERM)
        queued = api.wait(job_id, "queued again", lambda j: j["status"] == "queued")
        worker.wait(120)
        assert procs.wait_gone(tree) == set()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        _start_worker(service)
    step = queued["progress"]["step"]
    assert 5 <= step < MAX_STEPS
    kinds = {(c["kind"], c["step"]) for c in api.checkpoints(job_id)}
    assert ("last", step) in kinds  # and the best evaluation's, at a multiple of 4
    assert all(k == "last" or (k == "best" and s % 4 == 0 and s <= step) for k, s in kinds)
    before = api.metrics(job_id)
    assert [r["step"] for r in before] == list(range(1, step + 1))
    samples_before = samples(api, job_id)

    finished = api.wait_finished(job_id)
    assert finished["status"] == "succeeded", finished["error"]
    assert [a["outcome"] for a in finished["attempt_history"]] == ["interrupted", "succeeded"]
    assert finished["attempt_history"][1]["resumed_from_step"] == step
    after = api.metrics(job_id, page_size=1000)
    assert [r["step"] for r in after] == list(range(1, MAX_STEPS + 1))
    assert after[:step] == before  # resumed, not restarted: the first worker's rows unchanged
    stored = samples(api, job_id)
    steps = [s["step"] for s in stored]
    assert steps == sorted(set(steps))  # one row per evaluation step, none duplicated
    assert stored[:len(samples_before)] == samples_before
    assert steps[-1] == MAX_STEPS

    result = api.client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["task"] == "ppo" and result["steps"] == MAX_STEPS
    assert result["stop_reason"] == "max_steps"
    assert result["final_reward_mean"] is not None and result["final_kl"] is not None
    assert result["init_from"]["job_id"] == lm_id
    # Its checkpoints are the policy's, a language model: the inference server generates
    # from them and exports them like a language-model job's.
    gen = api.client.post(f"/v1/jobs/{job_id}/generate", json={
        "checkpoint": "last", "prompt": "", "max_new_tokens": 8, "num_samples": 2, "seed": 1})
    assert gen.status_code == 200, gen.text
    assert [len(x["text"]) for x in gen.json()["samples"]] == [8, 8]
    exported = api.client.get(f"/v1/jobs/{job_id}/checkpoints/last/export",
                              params={"format": "safetensors"})
    assert exported.status_code == 200, exported.text
    assert exported.headers["X-Export-SHA256"] == hashlib.sha256(exported.content).hexdigest()
    # Its checkpoints are language-model checkpoints: another PPO job may start from it.
    again = submit_ppo(api, job_id, max_steps=2, eval_interval=2)
    assert api.wait_finished(again["id"])["status"] == "succeeded"


def test_cancelling_a_running_ppo_job_keeps_a_last_checkpoint(api: Api, lm_id: str) -> None:
    job_id = submit_ppo(api, lm_id, max_steps=1_000_000, eval_interval=1_000_000)["id"]
    api.wait(job_id, "running", lambda j: j["progress"]["step"] >= 2)
    api.cancel(job_id)
    finished = api.wait_finished(job_id)
    assert finished["status"] == "cancelled"
    last = [c for c in api.checkpoints(job_id) if c["kind"] == "last"]
    assert len(last) == 1 and 2 <= last[0]["step"] <= finished["progress"]["step"]
    steps = [r["step"] for r in api.metrics(job_id)]
    assert steps == list(range(1, len(steps) + 1))
    result = api.client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["stop_reason"] == "cancelled"
    # The cancelled job's last checkpoint is a language model's: generation is not needed
    # here, but init_from takes it by id.
    ok = api.client.post("/v1/jobs", json={
        "task": "ppo", "init_from": {"job_id": job_id, "checkpoint": last[0]["id"]},
        "ppo": PPO, "training": {**CPU, "max_steps": 1}})
    assert ok.status_code == 422  # a cancelled job is not a succeeded one
    assert ok.json()["error"]["field"] == "init_from.job_id"
