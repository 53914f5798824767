"""A worker stopped while a job runs (SIGTERM to ``lmforge worker``, as ``docker stop`` and
``lmforge up`` send it): the job saves a ``last`` checkpoint, goes back to queued at once
without using up an attempt, and the next worker resumes it from that checkpoint."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest

from lmforge.processes import spawn

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MAX_STEPS = 2000  # far more than run before the SIGTERM lands, a few seconds after the resume


def _start_worker(service: Any) -> None:
    """A new worker for ``service``, as the fixture starts it, logging to the same file."""
    env = {
        **os.environ,
        "LMFORGE_HOME": str(service.home),
        "DATABASE_URL": service.database_url,
        "REDIS_URL": service.redis_url,
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "lmforge.cli", "worker", "--concurrency", "1",
            "--hostname", f"{service.name}@%h"]
    with open(service.logs["worker"], "ab") as log:
        service.procs["worker"] = spawn(argv, env=env, log=log)


def test_sigterm_to_worker_requeues_its_job_and_the_next_worker_resumes_it(
    api: Any, procs: Any
) -> None:
    service = api.service
    job_id = api.submit(
        name="e2e-shutdown",
        training={"max_steps": MAX_STEPS, "eval_interval": MAX_STEPS, "log_interval": 5},
    )["id"]
    api.wait_running(job_id)

    worker = service.procs["worker"]
    tree = procs.descendants(worker.pid)
    try:
        worker.send_signal(signal.SIGTERM)
        queued = api.wait(job_id, "queued again", lambda j: j["status"] == "queued")
        worker.wait(120)
        assert procs.wait_gone(tree) == set()  # no pool process trains on
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        _start_worker(service)  # the next tests need a worker too

    step = queued["progress"]["step"]
    assert 1 <= step < MAX_STEPS
    # A graceful interruption is recorded, but does not count toward LMFORGE_MAX_ATTEMPTS.
    assert (queued["attempts"], queued["interruptions"]) == (1, 1)
    assert [(a["attempt"], a["outcome"]) for a in queued["attempt_history"]] == [
        (1, "interrupted")]
    assert [(c["kind"], c["step"]) for c in api.checkpoints(job_id)] == [("last", step)]
    before = api.metrics(job_id)
    assert [r["step"] for r in before] == list(range(1, step + 1))

    finished = api.wait_finished(job_id)
    assert finished["status"] == "succeeded", finished["error"]
    assert (finished["attempts"], finished["interruptions"]) == (2, 1)
    assert [(a["attempt"], a["outcome"]) for a in finished["attempt_history"]] == [
        (1, "interrupted"), (2, "succeeded")]
    assert finished["progress"]["step"] == MAX_STEPS
    after = api.metrics(job_id, page_size=1000)
    assert [r["step"] for r in after] == list(range(1, MAX_STEPS + 1))
    # Resumed, not restarted: the rows up to the checkpoint are those of the first worker,
    # wall-clock fields (tokens_per_s, elapsed_s) included.
    assert after[:step] == before
