"""Execution semantics of a job, with real parts: ``run_job`` on a real SQLite file or a real
PostgreSQL database, a real worker process killed with SIGKILL, threads racing on the job's
row, and the embedded PostgreSQL server stopped and started again in the middle of a run.

- resumable by default (a SIGKILLed job resumes from its default periodic checkpoint);
- a cancel noticed within about a heartbeat interval, not at the next metrics flush;
- a 202 is a promise (finish racing cancel, many times, on SQLite and PostgreSQL);
- every failure explained (code, message, retryable, phase, step), and the worker process
  takes the next job after an out-of-memory failure;
- the attempt history;
- the worker riding out a database outage.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update

from app.jobs import cancel_job
from core.contract import CheckpointBlob, CheckpointKind, StepMetrics
from core.errors import Conflict
from store.db import session_scope
from store.models import Job, JobStatus
from store.progress import claim_job, finish_job
from tests.support.jobenv import OWNER, Env, make_env
from tests.support.postgres import PostgresServer
from worker.engine import trainer as trainer_module
from worker.engine.model import LSTMLanguageModel
from worker.runner import DatabaseHooks, DatabaseUnavailable, DbRetry

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 300.0  # a safety net for polls, never a measured bound


def _wait_for(what: str, predicate: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Run(threading.Thread):
    """``env.run(job_id)`` in a thread; ``status`` once it returns."""

    def __init__(self, env: Env, job_id: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.env, self.job_id, self.kwargs = env, job_id, kwargs
        self.status: JobStatus | None = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.status = self.env.run(self.job_id, **self.kwargs)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def finish(self) -> JobStatus | None:
        self.join(DEADLINE_S)
        assert not self.is_alive(), "run_job did not return"
        if self.error is not None:
            raise self.error
        return self.status


def _has_checkpoint(env: Env, job_id: str, kind: str) -> Callable[[], bool]:
    return lambda: any(c.kind.value == kind for c in env.checkpoints(job_id))


# -- 1. resumable by default ----------------------------------------------------------------------

_WORKER = """
import sys
from store.db import make_engine, make_session_factory
from store.settings import Settings
from store.storage import LocalStorage
from worker.runner import run_job
settings = Settings()
run_job(sys.argv[1], session_factory=make_session_factory(make_engine(settings.sqlalchemy_url)),
        storage=LocalStorage(settings.storage_dir), settings=settings, worker_id="doomed")
"""


def test_a_sigkilled_job_resumes_from_its_default_periodic_checkpoint(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    # Default checkpoint settings: a periodic checkpoint every 1,000 steps (or 300 s).
    job_id = env.submit(max_steps=1400, log_interval=50, eval_interval=100_000)
    child_env = {**os.environ, "LMFORGE_HOME": str(env.settings.lmforge_home),
                 "DATABASE_URL": env.settings.sqlalchemy_url, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, job_id], env=child_env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for("the periodic checkpoint", _has_checkpoint(env, job_id, "periodic"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    job = env.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.RUNNING, 1)  # the worker died mid-job
    with session_scope(env.factory) as s:  # what the sweep does once the lease has expired
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED,
                                                             worker_id=None))
    assert env.run(job_id) == JobStatus.SUCCEEDED
    job = env.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 2)
    assert env.steps(job_id) == list(range(1, 1401))  # each step once
    first, second = env.attempts(job_id)
    assert (first.attempt, first.worker, first.resumed_from_step) == (1, "doomed", None)
    assert (second.attempt, second.worker, second.resumed_from_step, second.outcome) == (
        2, "test", 1000, "succeeded")


# -- 2. bounded cancel ----------------------------------------------------------------------------


def test_a_cancel_is_noticed_within_a_heartbeat_not_at_the_next_flush(tmp_path: Path) -> None:
    env = make_env(tmp_path, LMFORGE_HEARTBEAT_TIMEOUT_S=3.0)  # a heartbeat every 0.5 s
    interval = env.settings.heartbeat_interval_s
    log_interval = 10_000
    job_id = env.submit(max_steps=10_000_000, log_interval=log_interval,
                        eval_interval=10_000_000, checkpoint_interval=100)
    run = _Run(env, job_id)
    run.start()
    # Training is under way once the first periodic checkpoint exists (no metric flush has
    # happened: the first would come at step 10,000).
    _wait_for("the first periodic checkpoint", _has_checkpoint(env, job_id, "periodic"))
    with session_scope(env.factory) as s:
        accepted = cancel_job(s, OWNER, job_id)
    asked_at = time.monotonic()
    assert accepted.status == JobStatus.RUNNING and accepted.cancel_requested
    assert run.finish() == JobStatus.CANCELLED
    assert run.ended_at is not None
    took = run.ended_at - asked_at
    job = env.job(job_id)
    assert job.status == JobStatus.CANCELLED
    last = [c for c in env.checkpoints(job_id) if c.kind.value == "last"]
    assert len(last) == 1 and last[0].step < log_interval
    assert env.steps(job_id) == list(range(1, last[0].step + 1))
    # The heartbeat picks the cancel up within one interval; the step, the last checkpoint
    # and the finish take a few more. Generous: twenty intervals.
    assert took < 20 * interval, (took, interval)


# -- 3. a 202 is a promise ------------------------------------------------------------------------


def _race_once(env: Env) -> tuple[str, dict[str, Any]]:
    """Claim a new job, then ``finish_job(succeeded)`` and the API's ``cancel_job`` at once
    from two threads (each its own session). Returns the job id and what each side saw."""
    job_id = env.submit()
    with session_scope(env.factory) as s:
        assert claim_job(s, job_id, "racer") is not None
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def finish() -> None:
        barrier.wait()
        with session_scope(env.factory) as s:
            outcome["finished"] = finish_job(s, job_id, 1, JobStatus.SUCCEEDED,
                                             result={"steps": 12})

    def cancel() -> None:
        barrier.wait()
        try:
            with session_scope(env.factory) as s:
                cancel_job(s, OWNER, job_id)
            outcome["cancel"] = "accepted"
        except Conflict as exc:
            outcome["cancel"] = exc.code

    threads = [threading.Thread(target=finish), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    return job_id, outcome


def _race_finish_against_cancel(env: Env, rounds: int) -> dict[str, int]:
    """:func:`_race_once` ``rounds`` times; check that an accepted cancel always ends
    ``cancelled`` and a refused one (409 ``job_finished``) ``succeeded``, and that the attempt
    is closed with the same outcome. Returns how often each side won."""
    wins = {"cancelled": 0, "succeeded": 0}
    for _ in range(rounds):
        job_id, outcome = _race_once(env)
        job = env.job(job_id)
        (attempt,) = env.attempts(job_id)
        if outcome["cancel"] == "accepted":
            assert job.status == JobStatus.CANCELLED == outcome["finished"], outcome
            assert job.result == {"steps": 12}  # kept
        else:
            assert outcome["cancel"] == "job_finished", outcome
            assert job.status == JobStatus.SUCCEEDED == outcome["finished"], outcome
        assert attempt.outcome == job.status.value and attempt.ended_at is not None
        wins[job.status.value] += 1
    return wins


def test_finish_racing_cancel_on_sqlite_never_drops_an_accepted_cancel(tmp_path: Path) -> None:
    wins = _race_finish_against_cancel(make_env(tmp_path), rounds=40)
    assert sum(wins.values()) == 40


def test_finish_racing_cancel_on_postgres_never_drops_an_accepted_cancel(
    tmp_path: Path, postgres_url: str,
) -> None:
    wins = _race_finish_against_cancel(make_env(tmp_path, postgres_url), rounds=40)
    assert sum(wins.values()) == 40


def test_a_cancel_that_arrives_after_training_ends_the_job_cancelled(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    job_id = env.submit()
    with session_scope(env.factory) as s:
        assert claim_job(s, job_id, "w") is not None
        cancel_job(s, OWNER, job_id)
    with session_scope(env.factory) as s:
        status = finish_job(s, job_id, 1, JobStatus.SUCCEEDED, result={"steps": 12})
    assert status == JobStatus.CANCELLED
    job = env.job(job_id)
    assert (job.status, job.result) == (JobStatus.CANCELLED, {"steps": 12})
    with pytest.raises(Conflict) as err, session_scope(env.factory) as s:
        cancel_job(s, OWNER, job_id)
    assert err.value.code == "job_finished"


# -- 4. every failure explained -------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def _raise_in_forward(monkeypatch: pytest.MonkeyPatch, exc: Callable[[], BaseException],
                      at_call: int) -> None:
    """The model's ``at_call``-th forward raises ``exc()`` (a new exception each time: one
    kept here would hold the failed run's frames through its traceback)."""
    real = LSTMLanguageModel.forward
    calls = {"n": 0}

    def forward(self: LSTMLanguageModel, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at_call:
            raise exc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LSTMLanguageModel, "forward", forward)


def test_out_of_memory_fails_the_job_cleanly_and_the_process_takes_the_next(
    env: Env, monkeypatch: pytest.MonkeyPatch,
) -> None:
    models: list[weakref.ref[LSTMLanguageModel]] = []
    real_build = trainer_module.build_model

    def build(*args: Any, **kwargs: Any) -> LSTMLanguageModel:
        model = real_build(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(trainer_module, "build_model", build)
    _raise_in_forward(monkeypatch, lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB"), at_call=3)
    doomed = env.submit()
    assert env.run(doomed) == JobStatus.FAILED
    job = env.job(doomed)
    assert job.error is not None
    assert {k: job.error[k] for k in ("code", "retryable", "phase", "step")} == {
        "code": "out_of_memory", "retryable": False, "phase": "train", "step": 3}
    assert "training.batch_size" in job.error["message"]
    assert models[0]() is None  # the failed job's model is gone from this process
    (attempt,) = env.attempts(doomed)
    assert (attempt.outcome, attempt.error) == ("failed", job.error)

    nxt = env.submit()
    assert env.run(nxt) == JobStatus.SUCCEEDED  # the same process takes the next job
    assert env.steps(nxt) == list(range(1, 13))


def test_an_unexpected_exception_is_internal_with_its_phase_and_step(
    env: Env, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.runner import internal_message

    leak = "Error 111 connecting to 10.1.2.3:6379. Connection refused."
    _raise_in_forward(monkeypatch, lambda: ConnectionError(leak), at_call=5)
    job_id = env.submit()
    assert env.run(job_id) == JobStatus.FAILED
    error = env.job(job_id).error
    # The class only: the exception's text (an internal address here) stays in the log.
    assert error == {"code": "internal", "message": internal_message(ConnectionError()),
                     "retryable": True, "phase": "train", "step": 5}
    assert "ConnectionError" in error["message"] and "10.1.2.3" not in str(error)


def test_a_timeout_fails_the_job_and_keeps_its_last_checkpoint(env: Env) -> None:
    job_id = env.submit(max_steps=1000, max_duration_s=1e-9)
    assert env.run(job_id) == JobStatus.FAILED
    job = env.job(job_id)
    assert job.error is not None
    assert (job.error["code"], job.error["phase"], job.error["step"]) == ("timeout", "train", 1)
    assert [(c.kind.value, c.step) for c in env.checkpoints(job_id)] == [("last", 1)]


def test_preparation_failures_are_in_the_prepare_phase(env: Env) -> None:
    from app.datasets import storage_key

    missing = env.submit()
    env.storage.delete(storage_key(env.dataset_id))
    assert env.run(missing) == JobStatus.FAILED
    error = env.job(missing).error
    assert error is not None
    assert {k: error[k] for k in ("code", "retryable", "phase", "step")} == {
        "code": "dataset_error", "retryable": False, "phase": "prepare", "step": None}

    broken = env.submit()
    with session_scope(env.factory) as s:  # a spec that no longer validates
        job = s.get_one(Job, broken)
        job.spec = {**job.spec, "training": {**job.spec["training"], "batch_size": -1}}
    assert env.run(broken) == JobStatus.FAILED
    error = env.job(broken).error
    assert error is not None and (error["code"], error["phase"]) == ("invalid_spec", "prepare")
    assert "batch_size" in error["message"]


# -- 5. attempt history ---------------------------------------------------------------------------


def test_each_way_an_attempt_ends_is_recorded(env: Env) -> None:
    ok = env.submit()
    env.run(ok)
    (a,) = env.attempts(ok)
    assert (a.attempt, a.worker, a.outcome, a.resumed_from_step, a.error) == (
        1, "test", "succeeded", None, None)
    assert a.ended_at is not None and a.started_at <= a.ended_at

    cancelled = env.submit(max_steps=1000, log_interval=2)
    with session_scope(env.factory) as s:
        s.execute(update(Job).where(Job.id == cancelled).values(cancel_requested=True))
    env.run(cancelled)
    assert [x.outcome for x in env.attempts(cancelled)] == ["cancelled"]

    class ShutdownAfterClaim(threading.Event):
        looks = 0

        def is_set(self) -> bool:
            self.looks += 1
            return self.looks > 1

    interrupted = env.submit()
    assert env.run(interrupted, shutdown=ShutdownAfterClaim()) == JobStatus.QUEUED
    (a,) = env.attempts(interrupted)
    assert (a.outcome, a.ended_at is not None) == ("interrupted", True)
    env.run(interrupted)  # the next attempt, resumed; the interrupted one stays in the history
    first, second = env.attempts(interrupted)
    assert (first.attempt, first.outcome) == (1, "interrupted")
    assert (second.attempt, second.outcome, second.resumed_from_step) == (2, "succeeded", 1)
    job = env.job(interrupted)
    assert (job.attempts, job.interruptions) == (2, 1)


# -- 6. database outages --------------------------------------------------------------------------


def _rows(*steps: int) -> list[StepMetrics]:
    return [StepMetrics(step=i, epoch=0.0, train_loss=1.0, lr=0.1, grad_norm=1.0,
                        tokens_per_s=1.0, elapsed_s=0.1, tokens_seen=i) for i in steps]


def _claimed_hooks(env: Env, retry: DbRetry) -> tuple[str, DatabaseHooks]:
    job_id = env.submit()
    with session_scope(env.factory) as s:
        assert claim_job(s, job_id, "w") is not None
    return job_id, DatabaseHooks(job_id, 1, env.factory, env.storage, 3, retry=retry)


def test_metrics_and_checkpoints_written_during_a_postgres_restart_arrive_once(
    tmp_path: Path, private_postgres: PostgresServer,
) -> None:
    env = make_env(tmp_path, private_postgres.create_database("outage"))
    job_id, hooks = _claimed_hooks(env, DbRetry(budget_s=DEADLINE_S, first_s=0.1, max_s=0.5))
    hooks.on_metrics(_rows(1, 2))
    private_postgres.stop()
    hooks.on_metrics(_rows(3, 4))  # fails: the rows are kept
    hooks.on_metrics(_rows(5))
    assert hooks.failed_flushes == 2 and [r.step for r in hooks.unsent] == [3, 4, 5]
    writer = threading.Thread(target=hooks.on_checkpoint,
                              args=(CheckpointBlob(CheckpointKind.PERIODIC, 5, b"five"),))
    writer.start()  # retries until the server is back
    time.sleep(0.5)
    assert writer.is_alive()
    private_postgres.start()
    writer.join(DEADLINE_S)
    assert not writer.is_alive() and hooks.unsent == [] and not hooks.lost
    assert env.steps(job_id) == [1, 2, 3, 4, 5]
    (ckpt,) = env.checkpoints(job_id)
    assert (ckpt.step, env.storage.read_bytes(ckpt.storage_key)) == (5, b"five")


def test_a_lease_lost_during_an_outage_is_detected(
    tmp_path: Path, private_postgres: PostgresServer,
) -> None:
    env = make_env(tmp_path, private_postgres.create_database("lease"))
    job_id, hooks = _claimed_hooks(env, DbRetry(budget_s=5, first_s=0.1, max_s=0.5))
    private_postgres.stop()
    hooks.on_metrics(_rows(1, 2))
    assert hooks.failed_flushes == 1 and not hooks.lost
    private_postgres.start()
    with session_scope(env.factory) as s:  # meanwhile the sweep gave the job to attempt 2
        s.execute(update(Job).where(Job.id == job_id).values(attempts=2))
    hooks.on_metrics(_rows(3))
    assert hooks.lost and hooks.should_stop()
    assert env.steps(job_id) == []  # the stale attempt wrote nothing


def test_a_checkpoint_row_that_cannot_be_written_in_time_leaves_no_blob(
    tmp_path: Path, private_postgres: PostgresServer,
) -> None:
    env = make_env(tmp_path, private_postgres.create_database("budget"))
    job_id, hooks = _claimed_hooks(env, DbRetry(budget_s=1.0, first_s=0.1, max_s=0.2))
    private_postgres.stop()
    with pytest.raises(DatabaseUnavailable):
        hooks.on_checkpoint(CheckpointBlob(CheckpointKind.LAST, 3, b"three"))
    blobs = env.storage.root / "checkpoints" / job_id
    assert not blobs.exists() or list(blobs.iterdir()) == []
    private_postgres.start()
    assert env.checkpoints(job_id) == []


def test_a_job_rides_out_a_postgres_restart(
    tmp_path: Path, private_postgres: PostgresServer, caplog: pytest.LogCaptureFixture,
) -> None:
    env = make_env(tmp_path, private_postgres.create_database("ride"))
    job_id = env.submit(max_steps=400, log_interval=5, eval_interval=100,
                        checkpoint_interval=50)
    caplog.set_level(logging.WARNING, logger="worker.runner")
    run = _Run(env, job_id, db_retry=DbRetry(budget_s=DEADLINE_S, first_s=0.1, max_s=0.5))
    run.start()
    _wait_for("training", lambda: env.job(job_id).progress.get("step", 0) >= 20)
    private_postgres.stop()

    def outage_seen() -> bool:
        return any("database is unavailable" in r.getMessage() for r in caplog.records)

    _wait_for("the worker to meet the outage", outage_seen)
    private_postgres.start()
    assert run.finish() == JobStatus.SUCCEEDED
    job = env.job(job_id)
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
    assert env.steps(job_id) == list(range(1, 401))  # no gap, no duplicate
    assert job.progress["step"] == 400
    kinds = sorted((c.kind.value, c.step) for c in env.checkpoints(job_id))
    assert ("last", 400) in kinds
    assert [a.outcome for a in env.attempts(job_id)] == ["succeeded"]
    assert all(env.storage.exists(c.storage_key) for c in env.checkpoints(job_id))


# -- the service's resumability bound -------------------------------------------------------------


@pytest.mark.parametrize(("job", "service", "expected"), [
    ((None, None), (1000, 300.0), (1000, 300.0)),   # no bound of its own: the service's
    ((1000, 300.0), (20, 2.0), (20, 2.0)),          # the service requires more often
    ((5, 1.0), (1000, 300.0), (5, 1.0)),            # the job asks for more often: it wins
    ((5000, None), (1000, 300.0), (1000, 300.0)),   # never less often than the service
])
def test_the_service_bound_caps_each_jobs_checkpoint_interval(
    job: tuple[int | None, float | None], service: tuple[int, float],
    expected: tuple[int, float],
) -> None:
    from core.spec import JobSpec
    from store.settings import Settings
    from worker.runner import with_service_bounds

    spec = JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"},
        "training": {"checkpoint_interval": job[0], "checkpoint_every_s": job[1]}})
    settings = Settings(LMFORGE_CHECKPOINT_EVERY_STEPS=service[0],
                        LMFORGE_CHECKPOINT_EVERY_S=service[1])
    t = with_service_bounds(spec, settings).training
    assert (t.checkpoint_interval, t.checkpoint_every_s) == expected
    assert spec.training.checkpoint_interval == job[0]  # the stored spec is left as it was


# -- the running-jobs quota, enforced where jobs start --------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_jobs_past_the_running_quota_wait_queued_until_a_slot_frees(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str,
) -> None:
    """LMFORGE_QUOTA_RUNNING_JOBS=1: while the owner's first job runs, the claim of its second
    does nothing (it stays queued, no attempt); once the first ends, the second is claimed.
    Admins' jobs are exempt."""
    from sqlalchemy import update

    from store.apikeys import create_key
    from store.progress import claim_job

    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    env = make_env(tmp_path, url, LMFORGE_QUOTA_RUNNING_JOBS=1)
    first, second = env.submit(), env.submit()
    with session_scope(env.factory) as s:
        assert claim_job(s, first, "w1", 1) is not None
    with session_scope(env.factory) as s:
        assert claim_job(s, second, "w2", 1) is None
    job = env.job(second)
    assert (job.status, job.attempts, env.attempts(second)) == (JobStatus.QUEUED, 0, [])
    assert env.run(second) is None  # the runner passes the setting to the claim
    assert env.job(second).status == JobStatus.QUEUED
    with session_scope(env.factory) as s:  # the first one ends: a slot frees
        s.execute(update(Job).where(Job.id == first).values(status=JobStatus.SUCCEEDED))
    assert env.run(second) == JobStatus.SUCCEEDED
    # An admin principal of the same name is exempt.
    third, fourth = env.submit(), env.submit()
    with session_scope(env.factory) as s:
        create_key(s, OWNER.id, is_admin=True)
    with session_scope(env.factory) as s:
        assert claim_job(s, third, "w1", 1) is not None
        assert claim_job(s, fourth, "w2", 1) is not None
