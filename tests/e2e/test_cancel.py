"""Cancelling jobs through the real service: a queued job at once, a running one at its next
step with a last checkpoint. The single worker (concurrency 1) keeps the second job queued
while a long one runs."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_cancel_of_running_job_saves_last_checkpoint(api: Any) -> None:
    job = api.submit_long()
    api.wait_running(job["id"])

    accepted = api.cancel(job["id"])
    assert accepted["id"] == job["id"]
    finished = api.wait_finished(job["id"])

    assert finished["status"] == "cancelled"
    assert finished["finished_at"] is not None
    checkpoints = api.checkpoints(job["id"])
    last = [c for c in checkpoints if c["kind"] == "last"]
    assert len(last) == 1
    assert 1 <= last[0]["step"] <= finished["progress"]["step"]
    steps = [row["step"] for row in api.metrics(job["id"])]
    assert steps == list(range(1, len(steps) + 1))


def test_result_is_409_while_the_job_runs(api: Any) -> None:
    job = api.submit_long()
    try:
        api.wait_running(job["id"])
        response = api.client.get(f"/v1/jobs/{job['id']}/result")
        assert response.status_code == 409
        assert response.json()["error"]["message"]
    finally:
        api.cancel(job["id"])
        api.wait_finished(job["id"])


def test_cancel_of_queued_job_is_immediate_and_it_never_runs(api: Any) -> None:
    blocker = api.submit_long()
    api.wait_running(blocker["id"])
    queued = api.submit(name="e2e-queued")
    assert api.job(queued["id"])["status"] == "queued"

    accepted = api.cancel(queued["id"])
    assert accepted["status"] == "cancelled"
    assert api.job(queued["id"])["status"] == "cancelled"

    api.cancel(blocker["id"])
    assert api.wait_finished(blocker["id"])["status"] == "cancelled"
    # The worker takes messages in order: once a job submitted after the cancelled one has
    # succeeded, the cancelled job's message has been delivered too, and must have done nothing.
    after = api.submit(name="e2e-after", training={"max_steps": 5, "eval_interval": 5})
    assert api.wait_finished(after["id"])["status"] == "succeeded"
    job = api.job(queued["id"])
    assert job["status"] == "cancelled"
    assert job["started_at"] is None
    assert job["progress"]["step"] == 0
    assert api.metrics(queued["id"]) == []
    assert api.checkpoints(queued["id"]) == []


def test_cancel_of_finished_job_is_409(api: Any) -> None:
    job = api.submit(name="e2e-tiny", training={"max_steps": 5, "eval_interval": 5})
    assert api.wait_finished(job["id"])["status"] == "succeeded"
    response = api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert api.job(job["id"])["status"] == "succeeded"
