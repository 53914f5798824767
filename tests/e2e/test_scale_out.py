"""Scale-out (issue 11): two API processes and two worker processes, each with an
``LMFORGE_HOME`` of its own (no shared disk, as on four machines), sharing only one PostgreSQL
database, one Redis server and one S3-compatible object store (a real ``moto`` server
process). See :mod:`tests.support.cluster`.

- A dataset uploaded and a job submitted through API A are seen, polled and downloaded through
  API B (and the submission, retried through B with its Idempotency-Key, is the same job); the
  blobs are objects in the bucket and no node has a file in its local storage.
- SIGKILL of the whole worker running a job, after its first periodic checkpoint: the other
  worker takes the job (second attempt, another worker), resumes it from that checkpoint's
  step (read from the object store: it has no local copy) and finishes it with every step
  recorded once.
- Two jobs submitted at once (one through each API) run at the same time, one on each
  worker.

Settings come from the nodes' environment (a short lease and requeue bound, so that a dead
worker's job is handed back within seconds); every wait polls with a safety-net deadline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select

from core.corpora import builtin_corpus, find_corpus
from store.models import Checkpoint, Dataset
from tests.e2e.conftest import SMALL_MODEL, SMALL_TRAINING, Api, deep_merge
from tests.support.cluster import Cluster, Node, wait_for
from tests.support.s3 import MotoServer, make_bucket, s3_client, s3_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# The lease of a running job and the queued sweep's bound, scaled down to test-sized jobs
# (docs/operations.md): a dead worker's job is handed back within seconds.
SETTINGS = {"LMFORGE_HEARTBEAT_TIMEOUT_S": "6", "LMFORGE_REQUEUE_AFTER_S": "5",
            "LMFORGE_MAX_ATTEMPTS": "5"}
PREFIX = "scale"


def corpus_text() -> str:
    """20,000 characters of real English text (tinyshakespeare when present)."""
    path = find_corpus("tinyshakespeare/input.txt")
    text = path.read_text(encoding="utf-8") if path else builtin_corpus("python-docs")
    return text[:20_000]


@pytest.fixture(scope="module")
def bucket(s3_server: MotoServer) -> str:
    return make_bucket(s3_server)


@pytest.fixture(scope="module")
def cluster(
    make_postgres_database: Callable[[], str], s3_server: MotoServer, bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """APIs ``a`` and ``b`` and two workers on one PostgreSQL database, Redis and bucket
    (shared by this module's tests; a test that kills a worker starts another with
    :meth:`Cluster.ensure_workers`)."""
    c = Cluster(tmp_path_factory.mktemp("cluster"), make_postgres_database(),
                s3_env(s3_server, bucket, PREFIX), dict(SETTINGS))
    try:
        c.ensure_workers(2)
        c.start_api("a")
        c.start_api("b")
        yield c
    finally:
        c.close()


@pytest.fixture
def dataset(cluster: Cluster) -> dict[str, Any]:
    """A text dataset uploaded through API ``a``."""
    a = cluster.apis["a"]
    assert a.client is not None
    response = a.client.post("/v1/datasets", data={"name": "scale-out"},
                             files={"file": ("corpus.txt", corpus_text().encode(), "text/plain")})
    assert response.status_code == 201, response.text
    return dict(response.json())


def api(node: Node, dataset: dict[str, Any]) -> Api:
    return Api(node, {"dataset_id": dataset["id"]})


def spec(steps: int, **training: Any) -> dict[str, Any]:
    return {"name": "scale-out", "tokenizer": {"kind": "char"}, "model": SMALL_MODEL,
            "training": deep_merge(SMALL_TRAINING, {"max_steps": steps, "eval_interval": steps,
                                                    "log_interval": 5, **training})}


def bucket_keys(server: MotoServer, bucket: str) -> set[str]:
    pages = s3_client(server).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def attempts_of(job: dict[str, Any]) -> list[tuple[int, str]]:
    return [(a["attempt"], a["outcome"]) for a in job["attempt_history"]]


def assert_no_local_blobs(cluster: Cluster) -> None:
    """No node wrote a blob to its own disk: datasets and checkpoints live in the bucket."""
    local = {n.name: n.stored_files() for n in cluster.nodes()}
    assert all(not files for files in local.values()), local


def test_a_dataset_and_job_sent_to_one_api_are_served_by_the_other_from_the_object_store(
    cluster: Cluster, dataset: dict[str, Any], s3_server: MotoServer, bucket: str,
) -> None:
    cluster.ensure_workers(2)
    a, b = api(cluster.apis["a"], dataset), api(cluster.apis["b"], dataset)

    seen = b.client.get(f"/v1/datasets/{dataset['id']}")
    assert seen.status_code == 200, seen.text
    assert (seen.json()["sha256"], seen.json()["bytes"]) == (dataset["sha256"], dataset["bytes"])

    steps = 40
    body = a.spec(**spec(steps, eval_interval=20))
    key = {"Idempotency-Key": "scale-out-1"}
    sent = a.client.post("/v1/jobs", json=body, headers=key)
    assert sent.status_code == 201, sent.text
    job_id = sent.json()["id"]
    # A client retrying through the other API (behind a load balancer) gets the same job.
    retried = b.client.post("/v1/jobs", json=body, headers=key)
    assert retried.status_code == 200, retried.text
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json()["id"] == job_id
    job = b.wait_finished(job_id)
    assert job["status"] == "succeeded", (job["error"], cluster.logs())
    assert attempts_of(job) == [(1, "succeeded")]
    assert [r["step"] for r in b.metrics(job_id, 1000)] == list(range(1, steps + 1))

    checkpoints = b.checkpoints(job_id)
    assert "last" in {c["kind"] for c in checkpoints}, checkpoints
    for ckpt in checkpoints:
        got = b.client.get(f"/v1/jobs/{job_id}/checkpoints/{ckpt['id']}/download",
                           follow_redirects=True)
        assert got.status_code == 200, got.text
        assert hashlib.sha256(got.content).hexdigest() == ckpt["sha256"]
        assert len(got.content) == ckpt["bytes"]

    # Every blob is an object in the bucket, under the storage URL's prefix.
    with cluster.session() as s:
        keys = [s.scalars(select(Dataset.storage_key).where(Dataset.id == dataset["id"])).one()]
        keys += list(s.scalars(select(Checkpoint.storage_key)
                               .where(Checkpoint.job_id == job_id)))
    in_bucket = bucket_keys(s3_server, bucket)
    missing = [k for k in keys if f"{PREFIX}/{k}" not in in_bucket]
    assert not missing, (missing, sorted(in_bucket))
    assert_no_local_blobs(cluster)


def test_a_killed_worker_s_job_moves_to_the_other_worker_and_resumes_from_the_stored_checkpoint(
    cluster: Cluster, dataset: dict[str, Any], s3_server: MotoServer, bucket: str,
) -> None:
    cluster.ensure_workers(2)
    a, b = api(cluster.apis["a"], dataset), api(cluster.apis["b"], dataset)
    steps, interval = 600, 20
    job_id = a.submit(**spec(steps, checkpoint_interval=interval))["id"]

    # Running, with a periodic checkpoint stored (and it is the bucket's, not a local file).
    def periodic() -> list[dict[str, Any]]:
        job = b.job(job_id)
        assert job["status"] in ("queued", "running"), (job, cluster.logs())
        return [c for c in b.checkpoints(job_id) if c["kind"] == "periodic"]

    stored = wait_for("a periodic checkpoint stored", periodic, details=cluster.logs)
    with cluster.session() as s:
        key = s.scalars(select(Checkpoint.storage_key)
                        .where(Checkpoint.id == stored[0]["id"])).one()
    assert f"{PREFIX}/{key}" in bucket_keys(s3_server, bucket)
    first = b.job(job_id)
    assert first["status"] == "running", first
    victim = cluster.worker_running(first["attempt_history"][-1]["worker"])
    (survivor,) = [w for w in cluster.live_workers() if w is not victim]
    at_kill = first["progress"]["step"]
    victim.kill_group()

    job = b.wait_finished(job_id)
    assert job["status"] == "succeeded", (job["error"], cluster.logs())
    assert attempts_of(job) == [(1, "lost"), (2, "succeeded")], (job, cluster.logs())
    lost, resumed = job["attempt_history"]
    assert resumed["worker"] != lost["worker"]
    # The survivor's pool process (it stays: one per worker, never replaced between jobs).
    assert cluster.worker_running(resumed["worker"]) is survivor
    # Resumed from a periodic checkpoint that the first worker stored, not from scratch.
    step = resumed["resumed_from_step"]
    assert step is not None and stored[0]["step"] <= step < steps, (step, at_kill)
    assert step % interval == 0, step
    assert [r["step"] for r in b.metrics(job_id, 1000)] == list(range(1, steps + 1))
    assert_no_local_blobs(cluster)


def test_two_jobs_submitted_at_once_run_concurrently_on_the_two_workers(
    cluster: Cluster, dataset: dict[str, Any],
) -> None:
    workers = cluster.ensure_workers(2)
    a, b = api(cluster.apis["a"], dataset), api(cluster.apis["b"], dataset)
    # Jobs that run until cancelled: they are seen running at the same time however long a
    # fresh worker takes to start its first job.
    endless = spec(1_000_000, eval_interval=1_000_000)
    first = a.submit(**endless)["id"]
    second = b.submit(**endless)["id"]

    def both_running() -> list[dict[str, Any]] | None:
        jobs = [b.job(first), a.job(second)]
        assert not any(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs), (
            jobs, cluster.logs())
        if all(j["status"] == "running" and j["progress"]["step"] >= 1 for j in jobs):
            return jobs
        return None

    running = wait_for("both jobs running at once", both_running, details=cluster.logs)
    on = [cluster.worker_running(j["attempt_history"][-1]["worker"]).name for j in running]
    assert sorted(on) == sorted(w.name for w in workers), on
    b.cancel(first)
    a.cancel(second)

    done = [a.wait_finished(first), b.wait_finished(second)]
    for job in done:
        assert job["status"] == "cancelled", (job["error"], cluster.logs())
        assert attempts_of(job) == [(1, "cancelled")]
    (x,), (y,) = (j["attempt_history"] for j in done)
    assert x["worker"] != y["worker"]
    assert x["started_at"] < y["ended_at"] and y["started_at"] < x["ended_at"]
