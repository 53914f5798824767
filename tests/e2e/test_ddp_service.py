"""Data-parallel jobs on the service (issue 11; docs/deploy.md, "Data-parallel jobs"), with real
processes: Redis, the API and ``lmforge worker --device cpu --gpus-per-job 2`` (serving the
``cpu-x2`` queue) on one SQLite database. A job with ``resources: {"device": "cpu", "gpus":
2}`` trains on two gloo processes (the worker's pool process as rank 0, one
``python -m worker.ddp_rank`` subprocess):

- it succeeds, reporting every step once (rank 0 alone reports) with both ranks' tokens, and
  no rank process outlives it;
- a rank killed mid-run fails the attempt with ``rank_failed``; the worker queues the job
  again, the next attempt resumes from the last periodic checkpoint and finishes it, every
  step still recorded once;
- with ``LMFORGE_MAX_ATTEMPTS=1`` the same job fails with ``rank_failed`` instead;
- SIGTERM to the worker reaches rank 0, every rank stops in step, ``last`` is saved and the
  job goes back to the queue; another worker resumes it to the end.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from lmforge import proctree
from store.db import session_scope
from store.models import JobAttempt
from tests.e2e.test_faults import wait_for
from tests.e2e.test_queues import QueueStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

STEPS = 40
SEQ_LEN = 32
BATCH = 8  # per process
DDP = {"resources": {"device": "cpu", "gpus": 2}}
TRAINING = {"batch_size": BATCH, "seq_len": SEQ_LEN, "max_steps": STEPS, "eval_interval": 20,
            "log_interval": 5, "checkpoint_interval": 10}


@contextmanager
def _ddp_stack(tmp_path: Path, **settings: str) -> Iterator[QueueStack]:
    # No sweep requeues a job within a test (an hour's lease): every requeue is the worker's.
    s = QueueStack(tmp_path / "stack", f"sqlite:///{tmp_path / 'lmforge.db'}",
                   LMFORGE_HEARTBEAT_TIMEOUT_S="3600", **settings)
    try:
        s.start_api()
        s.start_worker_with("ddp", "--device", "cpu", "--gpus-per-job", "2")
        (info,) = s.registered("ddp@")
        assert "cpu-x2" in info.queues and info.gpus_per_job == 2
        yield s
    finally:
        s.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[QueueStack]:
    with _ddp_stack(tmp_path) as s:
        yield s


def _rank_pids(stack: QueueStack, worker: str = "ddp") -> set[int]:
    """The worker's data-parallel rank processes (``python -m worker.ddp_rank``)."""
    out = set()
    for pid in proctree.descendants(stack.workers[worker].pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.ddp_rank" in argv:
            out.add(pid)
    return out


def _submit(stack: QueueStack, steps: int = STEPS) -> str:
    return stack.submit_spec(name="ddp", training={**TRAINING, "max_steps": steps}, **DDP)


def _assert_each_step_once(stack: QueueStack, job_id: str,
                           steps: int = STEPS) -> list[dict[str, Any]]:
    rows = stack.api.metrics(job_id, page_size=1000)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # tokens over both ranks: 2 processes x BATCH streams x SEQ_LEN per step
    assert [r["tokens_seen"] for r in rows] == [s * 2 * BATCH * SEQ_LEN
                                                for s in range(1, steps + 1)]
    return rows


def test_a_two_process_job_succeeds_reporting_from_rank_0_once(stack: QueueStack) -> None:
    job_id = _submit(stack)
    ranks = wait_for("a rank process", lambda: _rank_pids(stack))
    assert len(ranks) == 1
    job = stack.api.wait_finished(job_id)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["attempts"] == 1 and job["spec"]["resources"]["gpus"] == 2
    rows = _assert_each_step_once(stack, job_id)
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [20, 40]
    kinds = sorted((c["kind"], c["step"]) for c in stack.api.checkpoints(job_id))
    assert ("last", STEPS) in kinds and any(kind == "best" for kind, _ in kinds)
    result = stack.client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["tokens_seen"] == STEPS * 2 * BATCH * SEQ_LEN and result["steps"] == STEPS
    # The rank was reaped before the job was recorded as finished.
    assert proctree.wait_gone(ranks) == set()
    assert _rank_pids(stack) == set()


def test_a_killed_rank_requeues_the_job_which_resumes_and_finishes(stack: QueueStack) -> None:
    job_id = _submit(stack)
    stack.wait_step(job_id, 12)  # past the periodic checkpoint of step 10
    (rank,) = wait_for("a rank process", lambda: _rank_pids(stack))
    os.kill(rank, signal.SIGKILL)

    job = stack.api.wait(job_id, "finished on its second attempt",
                         lambda j: j["status"] == "succeeded" or j["status"] == "failed")
    assert job["status"] == "succeeded", (job, stack.logs())
    first, second = job["attempt_history"]
    assert first["outcome"] == "failed", first
    with session_scope(stack.factory) as s:  # the attempt's error, as the runner stored it
        error = s.scalars(select(JobAttempt.error).where(JobAttempt.job_id == job_id,
                                                         JobAttempt.attempt == 1)).one()
    assert error is not None and error["code"] == "rank_failed", error
    assert "rank 1 of 2" in error["message"] and "SIGKILL" in error["message"]
    assert second["outcome"] == "succeeded" and second["resumed_from_step"] >= 10, second
    _assert_each_step_once(stack, job_id)
    assert _rank_pids(stack) == set()


def test_a_killed_rank_past_max_attempts_fails_the_job_with_rank_failed(tmp_path: Path) -> None:
    with _ddp_stack(tmp_path, LMFORGE_MAX_ATTEMPTS="1") as stack:
        job_id = _submit(stack, 300)
        stack.wait_step(job_id, 5)
        (rank,) = wait_for("a rank process", lambda: _rank_pids(stack))
        os.kill(rank, signal.SIGKILL)
        job = stack.api.wait_finished(job_id)
        assert job["status"] == "failed", (job, stack.logs())
        error = job["error"]
        assert (error["code"], error["retryable"]) == ("rank_failed", True)
        # where rank 0 was when its collective failed: a step, or a periodic checkpoint's gather
        assert error["phase"] in ("train", "checkpoint", "evaluate")
        assert "rank 1 of 2" in error["message"] and "LMFORGE_MAX_ATTEMPTS" in error["message"]
        assert [(a["attempt"], a["outcome"]) for a in job["attempt_history"]] == [(1, "failed")]
        assert _rank_pids(stack) == set()


def test_sigterm_stops_every_rank_saves_last_and_another_worker_finishes(
    stack: QueueStack,
) -> None:
    steps = 300
    job_id = _submit(stack, steps)
    stack.wait_step(job_id, 5)
    ranks = _rank_pids(stack)
    assert len(ranks) == 1
    stack.start_worker_with("ddp2", "--device", "cpu", "--gpus-per-job", "2")
    stack.registered("ddp2@")
    stack.workers["ddp"].send_signal(signal.SIGTERM)
    stack.workers["ddp"].wait(120)
    assert proctree.wait_gone(ranks) == set()

    job = stack.api.wait_finished(job_id)
    assert job["status"] == "succeeded", (job, stack.logs())
    history = [(a["attempt"], a["outcome"]) for a in job["attempt_history"]]
    assert history == [(1, "interrupted"), (2, "succeeded")]
    first, second = job["attempt_history"]
    assert first["worker"] != second["worker"]  # "<host>:<pool pid>" of each worker
    assert second["resumed_from_step"] >= 5  # the `last` checkpoint the SIGTERM saved
    _assert_each_step_once(stack, job_id, steps)
    assert _rank_pids(stack, "ddp2") == set()
