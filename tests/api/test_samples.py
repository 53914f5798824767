"""``job_samples`` (migration 0006) and ``GET /v1/jobs/{id}/samples``: one row per (job, step)
whatever replays it, bounded rows, paging by step, ownership, and the rows go with the job."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from store.db import session_scope
from store.models import Job, JobSample
from store.progress import JobLost, claim_job
from store.samples import MAX_SAMPLES_PER_STEP, MAX_TEXT_CHARS, record_samples
from tests.api.conftest import bearer, small_spec, upload


def _running_job(client: TestClient, factory: sessionmaker[Session]) -> tuple[str, int]:
    ds = upload(client).json()["id"]
    job_id = client.post("/v1/jobs", json=small_spec(ds)).json()["id"]
    with session_scope(factory) as s:
        job = claim_job(s, job_id, "w1")
        assert job is not None
        return job_id, job.attempts


def _sample(i: int, reward: float = 0.5) -> dict[str, object]:
    return {"prompt": f"p{i}", "response": f"r{i}", "reward": reward}


def test_a_replayed_step_replaces_its_row_and_pages_follow_the_steps(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    job_id, attempt = _running_job(client, session_factory)
    for step in (10, 20, 30):
        with session_scope(session_factory) as s:
            assert record_samples(s, job_id, attempt, step, [_sample(step)]) is False
    # A resumed run replays the evaluation at step 20 with other samples: one row, the new one.
    with session_scope(session_factory) as s:
        record_samples(s, job_id, attempt, 20, [_sample(1, 0.9), _sample(2, 0.1)])
    with session_scope(session_factory) as s:
        assert s.scalar(select(func.count()).select_from(JobSample)
                        .where(JobSample.job_id == job_id)) == 3

    first = client.get(f"/v1/jobs/{job_id}/samples", params={"limit": 2}).json()
    assert [r["step"] for r in first["data"]] == [10, 20] and first["has_more"] is True
    assert first["data"][1]["samples"] == [_sample(1, 0.9), _sample(2, 0.1)]
    rest = client.get(f"/v1/jobs/{job_id}/samples", params={"after_step": 20}).json()
    assert [r["step"] for r in rest["data"]] == [30] and rest["has_more"] is False
    assert client.get(f"/v1/jobs/{job_id}/samples", params={"limit": 101}).status_code == 422


def test_a_row_is_bounded_and_json_safe(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    job_id, attempt = _running_job(client, session_factory)
    many = [_sample(i) for i in range(MAX_SAMPLES_PER_STEP + 5)]
    many[0] = {"prompt": "x" * (MAX_TEXT_CHARS + 7), "response": "y", "reward": float("nan")}
    with session_scope(session_factory) as s:
        record_samples(s, job_id, attempt, 1, many)
    row = client.get(f"/v1/jobs/{job_id}/samples").json()["data"][0]
    assert len(row["samples"]) == MAX_SAMPLES_PER_STEP
    assert row["samples"][0] == {"prompt": "x" * MAX_TEXT_CHARS, "truncated": True,
                                 "response": "y", "reward": None}


def test_only_the_running_attempt_writes_and_the_rows_go_with_the_job(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    job_id, attempt = _running_job(client, session_factory)
    with session_scope(session_factory) as s:
        record_samples(s, job_id, attempt, 5, [_sample(5)])
    with pytest.raises(JobLost), session_scope(session_factory) as s:
        record_samples(s, job_id, attempt + 1, 6, [_sample(6)])
    with session_scope(session_factory) as s:
        s.execute(delete(Job).where(Job.id == job_id))
    with session_scope(session_factory) as s:
        assert s.scalar(select(func.count()).select_from(JobSample)) == 0


def test_another_principals_job_is_404_and_a_job_without_samples_has_none(
    client: TestClient, session_factory: sessionmaker[Session], make_key: object
) -> None:
    job_id, attempt = _running_job(client, session_factory)
    with session_scope(session_factory) as s:
        record_samples(s, job_id, attempt, 5, [_sample(5)])
    other = make_key("bob")  # type: ignore[operator]
    r = client.get(f"/v1/jobs/{job_id}/samples", headers=bearer(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    empty_job, _ = _running_job(client, session_factory)
    assert client.get(f"/v1/jobs/{empty_job}/samples").json() == {"data": [],
                                                                  "has_more": False}
