"""``GET /v1/jobs/{id}``: ``attempt_history`` from ``job_attempts`` (as the runner's helpers
write it) and ``error`` as ``{code, message, retryable, phase, step}``."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from store.db import session_scope
from store.models import Job, JobStatus
from store.progress import claim_job, end_attempt, set_resumed_from
from store.status import transition
from tests.api.conftest import small_spec

Factory = sessionmaker[Session]
ATTEMPT_KEYS = {"attempt", "worker", "started_at", "ended_at", "resumed_from_step", "outcome"}


def test_attempt_history_lists_each_attempt_in_order(
    client: TestClient, dataset_id: str, session_factory: Factory
) -> None:
    job_id = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["attempt_history"] == []
    with session_scope(session_factory) as s:  # attempt 1 dies; the sweep requeues the job
        claim_job(s, job_id, "w1@host-a")
    with session_scope(session_factory) as s:
        end_attempt(s, job_id, 1, "lost")
        transition(s, job_id, JobStatus.QUEUED, expect=[JobStatus.RUNNING], worker_id=None)
    with session_scope(session_factory) as s:  # attempt 2 resumes from step 3 and succeeds
        claim_job(s, job_id, "w2@host-b")
        set_resumed_from(s, job_id, 2, 3)
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert [(a["attempt"], a["outcome"], a["ended_at"]) for a in running["attempt_history"]][
        1:] == [(2, "running", None)]
    with session_scope(session_factory) as s:
        end_attempt(s, job_id, 2, "succeeded")
        transition(s, job_id, JobStatus.SUCCEEDED, expect=[JobStatus.RUNNING])
    job = client.get(f"/v1/jobs/{job_id}").json()
    history = job["attempt_history"]
    assert all(set(a) == ATTEMPT_KEYS for a in history)
    assert [(a["attempt"], a["worker"], a["resumed_from_step"], a["outcome"])
            for a in history] == [(1, "w1@host-a", None, "lost"),
                                  (2, "w2@host-b", 3, "succeeded")]
    assert all(a["started_at"] <= a["ended_at"] for a in history)
    assert job["attempts"] == 2
    # The list of jobs carries the same history.
    listed = client.get("/v1/jobs").json()["data"]
    assert [j["attempt_history"] for j in listed if j["id"] == job_id] == [history]


def test_error_has_code_message_retryable_phase_and_step(
    client: TestClient, dataset_id: str, session_factory: Factory
) -> None:
    job_id = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    error = {"code": "out_of_memory", "message": "CUDA out of memory at batch 32; try 16",
             "retryable": False, "phase": "train", "step": 120}
    with session_scope(session_factory) as s:
        claim_job(s, job_id, "w1")
        transition(s, job_id, JobStatus.FAILED, expect=[JobStatus.RUNNING], error=error)
    assert client.get(f"/v1/jobs/{job_id}").json()["error"] == error
    assert client.get(f"/v1/jobs/{job_id}/result").json()["error"] == error


def test_an_error_recorded_before_retryable_and_phase_existed_reads_them_as_null(
    client: TestClient, dataset_id: str, session_factory: Factory
) -> None:
    job_id = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    with session_scope(session_factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.FAILED, error={"code": "worker_lost", "message": "lost"}))
    assert client.get(f"/v1/jobs/{job_id}").json()["error"] == {
        "code": "worker_lost", "message": "lost", "retryable": None, "phase": None,
        "step": None}
