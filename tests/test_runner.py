"""``worker.runner.run_job`` called directly (no Celery) on a real SQLite file, with the real
engine on a small real corpus, a tiny model and a few CPU steps."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from sqlalchemy import func, select, update

from app.datasets import storage_key
from core.routing import Route
from core.spec import TokenizerSpec
from lmforge.processes import free_port
from store.db import session_scope
from store.models import Job, JobStatus, Metric, utcnow
from store.s3storage import S3Storage
from store.sweep import sweep_and_requeue, sweep_orphans
from tests.support.jobenv import Env, corpus_text, make_env
from tests.support.s3 import MotoServer, make_bucket, s3_client
from worker.engine.tokenizers import build_tokenizer
from worker.runner import run_job

_corpus = corpus_text


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def test_run_job_succeeds_with_each_step_once_and_checkpoints_stored(env: Env) -> None:
    job_id = env.submit()
    env.run(job_id)
    job = env.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1 and job.finished_at is not None and job.error is None
    assert env.steps(job_id) == list(range(1, 13))
    assert job.progress == {"step": 12, "total_steps": 12, "tokens_seen": 12 * 4 * 16}
    assert job.result is not None and job.result["stop_reason"] == "max_steps"
    assert job.result["steps"] == 12
    ckpts = env.checkpoints(job_id)
    assert [c.kind.value for c in ckpts] == ["best", "last"]
    for c in ckpts:
        data = env.storage.read_bytes(c.storage_key)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (c.bytes, c.sha256)


def test_duplicate_delivery_of_a_claimed_job_does_nothing(env: Env) -> None:
    job_id = env.submit()
    env.run(job_id)
    before = env.job(job_id)
    env.run(job_id)  # the broker redelivers the same message
    after = env.job(job_id)
    assert (after.attempts, after.finished_at, after.status) == (
        before.attempts, before.finished_at, JobStatus.SUCCEEDED)
    assert env.steps(job_id) == list(range(1, 13))


def test_cancel_requested_stops_the_run_with_a_last_checkpoint(env: Env) -> None:
    job_id = env.submit(max_steps=1000, log_interval=2)
    with session_scope(env.factory) as s:  # as if the cancel arrived just after the claim
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    env.run(job_id)
    job = env.job(job_id)
    assert job.status == JobStatus.CANCELLED
    assert job.result is not None and job.result["stop_reason"] == "cancelled"
    assert env.steps(job_id) == [1, 2]
    assert [(c.kind.value, c.step) for c in env.checkpoints(job_id)] == [("last", 2)]


def test_bpe_corpus_too_small_past_the_submission_bound_fails_with_the_numbers(
    env: Env,
) -> None:
    # The API's bound (one token per UTF-8 byte) lets the job through; the trained
    # vocabulary's merges leave fewer tokens than one batch, which the worker reports.
    text = _corpus()
    train_text = text[: int(len(text) * 0.9)]
    tokens = len(build_tokenizer(TokenizerSpec(kind="bpe", vocab_size=300), train_text)
                 .encode(train_text))
    n_bytes = len(train_text.encode("utf-8"))
    seq_len = n_bytes // 16 - 1
    need = 16 * (seq_len + 1)
    assert tokens < need <= n_bytes  # the precondition: merges shrank the text
    job_id = env.submit("bpe", batch_size=16, seq_len=seq_len)
    env.run(job_id)
    job = env.job(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "corpus_too_small"
    assert f"has {tokens} tokens" in job.error["message"]
    assert f"16 x {seq_len + 1} = {need}" in job.error["message"]


def test_missing_dataset_blob_fails_with_dataset_error(env: Env) -> None:
    job_id = env.submit()
    env.storage.delete(storage_key(env.dataset_id))
    env.run(job_id)
    job = env.job(job_id)
    assert (job.status, job.error and job.error["code"]) == (JobStatus.FAILED, "dataset_error")


def test_a_dataset_blob_changed_in_storage_fails_with_dataset_error(env: Env) -> None:
    env.storage.put_bytes(storage_key(env.dataset_id), b"another text entirely\n" * 1000)
    job_id = env.submit()
    env.run(job_id)
    job = env.job(job_id)
    assert job.status == JobStatus.FAILED and job.error is not None
    assert job.error["code"] == "dataset_error" and "sha256" in job.error["message"]


def test_jobs_on_the_same_dataset_share_one_token_cache_entry(env: Env) -> None:
    first, second = env.submit(), env.submit(max_steps=6, batch_size=2)
    env.run(first)
    env.run(second)
    assert [env.job(j).status for j in (first, second)] == [JobStatus.SUCCEEDED] * 2
    assert env.settings.cache_dir == env.settings.lmforge_home / "cache" / "tokens"
    entries = [p for p in env.settings.cache_dir.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "train.bin").is_file()


def test_requeued_job_resumes_from_its_last_checkpoint_recording_each_step_once(
    env: Env,
) -> None:
    reference = env.submit()
    env.run(reference)
    job_id = env.submit(log_interval=2, checkpoint_interval=4)
    with session_scope(env.factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    env.run(job_id)  # stops at step 2 with a last checkpoint, like a worker going away
    with session_scope(env.factory) as s:  # what the sweep does for a dead worker
        s.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.QUEUED, cancel_requested=False, finished_at=None, result=None))
    env.run(job_id)
    job = env.job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2
    assert env.steps(job_id) == list(range(1, 13))
    assert env.train_losses(job_id) == pytest.approx(env.train_losses(reference), rel=1e-5)


def _running(env: Env, *, attempts: int, age_s: float, cancel: bool = False) -> str:
    job_id = env.submit()
    with session_scope(env.factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.RUNNING, attempts=attempts, cancel_requested=cancel,
            heartbeat_at=utcnow() - timedelta(seconds=age_s)))
    return job_id


def test_sweep_requeues_a_job_whose_heartbeat_is_stale(env: Env) -> None:
    stale = _running(env, attempts=1, age_s=600)
    fresh = _running(env, attempts=1, age_s=1)

    class Recorder:
        sent: list[str] = []

        def enqueue(self, job_id: str, route: Route) -> None:
            self.sent.append(job_id)

        def ping(self) -> bool:
            return True

    rec = Recorder()
    assert sweep_and_requeue(env.factory, rec, env.settings) == [stale]
    assert rec.sent == [stale]
    assert env.job(stale).status == JobStatus.QUEUED
    assert env.job(fresh).status == JobStatus.RUNNING


def test_sweep_fails_a_job_that_used_its_attempts_and_cancels_a_cancelled_one(
    env: Env,
) -> None:
    spent = _running(env, attempts=env.settings.max_attempts, age_s=600)
    cancelled = _running(env, attempts=1, age_s=600, cancel=True)
    with session_scope(env.factory) as s:
        assert sweep_orphans(s, heartbeat_timeout_s=120, max_attempts=3) == []
    job = env.job(spent)
    assert (job.status, job.error and job.error["code"]) == (JobStatus.FAILED, "worker_lost")
    assert env.job(cancelled).status == JobStatus.CANCELLED
    with session_scope(env.factory) as s:
        assert s.scalar(select(func.count()).select_from(Metric)) == 0


class _SetAfterClaim(threading.Event):
    """A worker shutdown that begins once the job runs: the first look (before the claim)
    finds it unset, every later one set."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > 1


def test_shutdown_requeues_the_job_at_a_last_checkpoint_as_an_uncounted_interruption(
    env: Env,
) -> None:
    reference = env.submit()
    env.run(reference)
    job_id = env.submit(log_interval=2)
    status = run_job(job_id, session_factory=env.factory, storage=env.storage,
                     settings=env.settings, worker_id="test", shutdown=_SetAfterClaim())
    assert status == JobStatus.QUEUED
    job = env.job(job_id)
    assert (job.status, job.attempts, job.interruptions, job.worker_id, job.finished_at,
            job.result) == (JobStatus.QUEUED, 1, 1, None, None, None)
    assert job.enqueued_at is not None  # the task requeues its message at once
    # should_stop is polled after every step: the shutdown is seen after step 1, not at the
    # first metrics flush (log_interval 2).
    assert env.steps(job_id) == [1]
    assert [(c.kind.value, c.step) for c in env.checkpoints(job_id)] == [("last", 1)]

    env.run(job_id)  # the next worker
    job = env.job(job_id)
    assert (job.status, job.attempts, job.interruptions) == (JobStatus.SUCCEEDED, 2, 1)
    assert env.steps(job_id) == list(range(1, 13))
    assert env.train_losses(job_id) == pytest.approx(env.train_losses(reference), rel=1e-5)


def test_shutdown_before_the_claim_leaves_the_job_queued_untouched(env: Env) -> None:
    job_id = env.submit()
    shutdown = threading.Event()
    shutdown.set()
    status = run_job(job_id, session_factory=env.factory, storage=env.storage,
                     settings=env.settings, worker_id="test", shutdown=shutdown)
    assert status == JobStatus.QUEUED
    job = env.job(job_id)
    assert (job.status, job.attempts, job.started_at) == (JobStatus.QUEUED, 0, None)
    assert env.steps(job_id) == []


def test_a_requested_cancel_wins_over_a_shutdown(env: Env) -> None:
    job_id = env.submit(max_steps=1000, log_interval=2)
    with session_scope(env.factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    status = run_job(job_id, session_factory=env.factory, storage=env.storage,
                     settings=env.settings, worker_id="test", shutdown=_SetAfterClaim())
    assert status == JobStatus.CANCELLED
    job = env.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.CANCELLED, 1)
    assert [(c.kind.value, c.step) for c in env.checkpoints(job_id)] == [("last", 1)]


def test_an_object_store_outage_fails_the_attempt_with_storage_unavailable_and_requeues_it(
    env: Env, s3_server: MotoServer,
) -> None:
    # The environment's dataset, copied into a bucket of a real S3 server (moto) under its key.
    bucket = make_bucket(s3_server)
    s3 = S3Storage(bucket, "runner", client=s3_client(s3_server))
    key = storage_key(env.dataset_id)
    s3.put_bytes(key, env.storage.read_bytes(key))
    job_id = env.submit()
    # The same bucket through an endpoint that nobody answers on: the store is down.
    down = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
                        aws_access_key_id="x", aws_secret_access_key="y",
                        region_name="us-east-1")
    status = env.run(job_id, storage=S3Storage(bucket, "runner", client=down))
    assert status == JobStatus.QUEUED  # the task puts its message back (worker.tasks)
    job = env.job(job_id)
    assert job.status == JobStatus.QUEUED and job.error is None
    [first] = env.attempts(job_id)
    assert first.outcome == "failed" and first.error is not None
    assert (first.error["code"], first.error["retryable"]) == ("storage_unavailable", True)
    assert "LMFORGE_STORAGE_URL" in first.error["message"]
    # The store is back: the next attempt runs the job to the end.
    env.run(job_id, storage=s3)
    job = env.job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2, job.error
    assert env.steps(job_id) == list(range(1, 13))


def test_an_object_store_outage_past_max_attempts_fails_the_job_with_storage_unavailable(
    tmp_path: Path, s3_server: MotoServer,
) -> None:
    env = make_env(tmp_path, LMFORGE_MAX_ATTEMPTS=1)
    job_id = env.submit()
    down = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
                        aws_access_key_id="x", aws_secret_access_key="y",
                        region_name="us-east-1")
    env.run(job_id, storage=S3Storage(make_bucket(s3_server), "runner", client=down))
    job = env.job(job_id)
    assert job.status == JobStatus.FAILED and job.error is not None
    assert (job.error["code"], job.error["retryable"]) == ("storage_unavailable", True)
