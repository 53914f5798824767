"""Long runs (issue 13): ``?resolution=N`` (min/max per bucket), ``metrics.csv``, ``?status=``
on the job list, and ``progress.eta_s``/``queue_position``; the SQL on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from app import metricseries
from core.errors import ValidationFailed
from core.eta import eta_seconds
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.models import Job, JobStatus, Metric, new_id, utcnow
from store.progress import claim_job
from tests.api.conftest import small_spec

Factory = sessionmaker[Session]
SPIKE_STEP, DIP_STEP = 3337, 7771


def _values(step: int, n: int) -> dict[str, Any]:
    """A decaying, wiggling loss with one spike up and one dip down, validation every 50
    steps, and a nested per-class value as a classifier reports."""
    loss = 1.5 + 3.0 * math.exp(-5 * step / n) + 0.05 * math.sin(step * 0.7)
    if step == SPIKE_STEP:
        loss = 40.0
    if step == DIP_STEP:
        loss = -3.0
    values: dict[str, Any] = {"epoch": step / 1000, "train_loss": loss, "lr": 1e-3,
                              "grad_norm": 0.5, "tokens_per_s": 1000.0 + step,
                              "elapsed_s": step * 0.01, "tokens_seen": step * 64,
                              "val_loss": None, "val_ppl": None}
    if step % 50 == 0:
        values["val_loss"] = loss + 0.25 if step != 5000 else 99.0
        values["val_per_class"] = {"a": {"f1": 0.5}}
    return values


def _fill(factory: Factory, job_id: str, n: int, start: int = 1) -> None:
    with session_scope(factory) as s:
        s.execute(insert(Metric), [{"job_id": job_id, "step": i, "values": _values(i, n)}
                                   for i in range(start, n + 1)])


def _job(factory: Factory, owner: str | None = "tester", status: JobStatus = JobStatus.SUCCEEDED,
         **extra: Any) -> str:
    job_id = new_id("job")
    with session_scope(factory) as s:
        s.add(Job(id=job_id, owner_id=owner, status=status, spec=extra.pop("spec", {}),
                  progress={"step": 0, "total_steps": 1, "tokens_seen": 0}, **extra))
    return job_id


@pytest.fixture(params=["sqlite", "postgres"])
def factory(request: pytest.FixtureRequest, sqlite_url: str) -> Factory:
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade_database(url)
    engine = make_engine(url)
    request.addfinalizer(engine.dispose)
    return make_session_factory(engine)


def test_downsample_keeps_every_extreme_within_the_resolution(factory: Factory) -> None:
    n = 10_000
    job_id = _job(factory)
    _fill(factory, job_id, n)
    with factory() as s:
        picked = metricseries.downsample(s, job_id, 200, "train_loss")
        all_rows = {i: _values(i, n) for i in range(1, n + 1)}
    steps = [r.step for r in picked.rows]
    assert picked.total == n and picked.buckets == 99
    assert len(steps) <= 200 and steps == sorted(steps) and len(set(steps)) == len(steps)
    assert SPIKE_STEP in steps and DIP_STEP in steps  # the global max and min
    assert steps[0] == 1 and steps[-1] == n  # the first and the last row
    for row in picked.rows:  # whole rows, as stored
        assert row.values == all_rows[row.step]
    # Every bucket's own min and max are there: the curve's envelope is kept.
    members: dict[int, list[float]] = {}
    for i in range(1, n + 1):
        members.setdefault((i - 1) * 99 // n, []).append(all_rows[i]["train_loss"])
    kept = {all_rows[s]["train_loss"] for s in steps}
    assert len(members) == 99
    for values in members.values():
        assert min(values) in kept and max(values) in kept


def test_downsample_of_validation_rows_and_edge_cases(factory: Factory) -> None:
    n = 10_000
    job_id = _job(factory)
    _fill(factory, job_id, n)
    with factory() as s:
        val = metricseries.downsample(s, job_id, 40, "val_loss")
        assert [r.step for r in val.rows][0] == 50 and val.rows[-1].step == n
        assert all(r.values["val_loss"] is not None for r in val.rows) and len(val.rows) <= 40
        assert 5000 in [r.step for r in val.rows]  # the validation spike
        # Fewer rows than the resolution: all of them with a number, in order.
        few = metricseries.downsample(s, job_id, 500, "val_loss", after_step=n - 400)
        assert [r.step for r in few.rows] == list(range(n - 350, n + 1, 50))
        assert few.total == 400 and few.buckets == 0
        assert metricseries.downsample(s, job_id, 100, "no_such_metric").rows == []
        assert metricseries.downsample(s, job_id, 100, "train_loss", after_step=n).total == 0
        with pytest.raises(ValidationFailed) as err:
            metricseries.downsample(s, job_id, 100, "val_per_class")
        assert err.value.field == "metric"


def test_csv_has_every_row_and_reads_back_to_the_stored_values(factory: Factory) -> None:
    job_id = _job(factory)
    _fill(factory, job_id, 120)
    body = b"".join(metricseries.csv_rows(factory, job_id)).decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 120 and [int(r["step"]) for r in rows] == list(range(1, 121))
    header = body.splitlines()[0].split(",")
    assert header[:3] == ["step", "epoch", "train_loss"] and header[-1] == "val_per_class"
    for r in rows:
        want = _values(int(r["step"]), 120)
        assert float(r["train_loss"]) == want["train_loss"]  # exactly: repr round-trips
        assert r["val_loss"] == ("" if want["val_loss"] is None else repr(want["val_loss"]))
        assert r["val_bpc"] == ""  # a StepMetrics field no row has
    assert rows[49]["val_per_class"] == '{"a":{"f1":0.5}}'


def test_queue_positions_follow_enqueue_order_then_unenqueued_jobs(factory: Factory) -> None:
    t0 = utcnow()
    late = _job(factory, status=JobStatus.QUEUED, enqueued_at=t0 + timedelta(seconds=5))
    early = _job(factory, owner="someone-else", status=JobStatus.QUEUED, enqueued_at=t0)
    waiting = _job(factory, status=JobStatus.QUEUED, enqueued_at=None)
    running = _job(factory, status=JobStatus.RUNNING)
    with factory() as s:
        pos = metricseries.queue_positions(s, [late, early, waiting, running])
    assert pos == {early: 1, late: 2, waiting: 3}


def _rows(*triples: tuple[int, float, int]) -> list[dict[str, Any]]:
    return [{"step": s, "elapsed_s": e, "tokens_seen": t, "epoch": s / 100}
            for s, e, t in triples]


def test_eta_from_the_recent_rate_and_the_nearest_budget() -> None:
    rows = _rows((40, 4.0, 4000), (30, 3.0, 3000), (20, 2.0, 2000))  # 10 steps/s
    assert eta_seconds({"training": {"max_steps": 100}}, rows) == 6.0
    # max_tokens nearer: 1000 tokens/s, 2000 left.
    assert eta_seconds({"training": {"max_steps": 100, "max_tokens": 6000}},
                                    rows) == 2.0
    # max_epochs: 0.1 epochs/s, 0.2 left; max_runtime_s: 1 s left of this run's 5.
    assert eta_seconds({"training": {"max_steps": 100, "max_epochs": 0.6}},
                                    rows) == 2.0
    assert eta_seconds({"training": {"max_steps": 100, "max_runtime_s": 5}},
                                    rows) == 1.0
    # A resume restarted elapsed_s: only the rows of the current run count (20 steps/s).
    resumed = _rows((40, 1.0, 4000), (20, 0.0, 2000), (10, 9.0, 1000))
    assert eta_seconds({"training": {"max_steps": 100}}, resumed) == 3.0
    assert eta_seconds({"training": {"max_steps": 100}}, rows[:1]) is None
    assert eta_seconds({"training": {"max_steps": 100}}, []) is None


# -- over HTTP (in process, SQLite) -----------------------------------------------------------


@pytest.fixture
def api_factory(session_factory: Factory) -> Factory:
    return session_factory


def test_metrics_resolution_and_csv_over_http(client: TestClient, api_factory: Factory,
                                              make_key: Callable[..., str]) -> None:
    job_id = _job(api_factory)
    _fill(api_factory, job_id, 3000)
    r = client.get(f"/v1/jobs/{job_id}/metrics", params={"resolution": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) <= 50 and body["has_more"] is False
    assert body["downsample"] == {"method": "minmax", "metric": "train_loss", "resolution": 50,
                                  "buckets": 24, "total": 3000}
    full = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10_000}).json()
    for extreme in (min, max):
        assert (extreme(row["train_loss"] for row in body["data"])
                == extreme(row["train_loss"] for row in full["data"]))
    assert body["downsample"]["total"] == len(full["data"])
    assert {row["step"]: row for row in full["data"]}[body["data"][7]["step"]] == body["data"][7]
    assert client.get(f"/v1/jobs/{job_id}/metrics").json()["downsample"] is None
    # The CSV is the JSON rows, every one.
    r = client.get(f"/v1/jobs/{job_id}/metrics.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert f'filename="{job_id}-metrics.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(full["data"]) == 3000
    for got, want in zip(rows, full["data"], strict=True):
        for key, value in want.items():
            if value is None:
                assert got[key] == ""
            elif isinstance(value, dict):
                continue
            else:
                assert type(value)(got[key]) == value, key
    # Bad parameters name themselves; another principal's job is 404 for both routes.
    bad: list[tuple[dict[str, str | int], str]] = [
        ({"resolution": 3}, "resolution"), ({"resolution": 10, "metric": "Bad-Name"}, "metric"),
        ({"resolution": 10, "metric": "val_per_class"}, "metric")]
    for params, field in bad:
        r = client.get(f"/v1/jobs/{job_id}/metrics", params=params)
        assert r.status_code == 422 and field in (r.json()["error"]["field"] or ""), r.text
    other = {"Authorization": f"Bearer {make_key('other')}"}
    for path in ("metrics?resolution=10", "metrics.csv"):
        r = client.get(f"/v1/jobs/{job_id}/{path}", headers=other)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_jobs_list_filters_by_status_across_pages(client: TestClient, dataset_id: str,
                                                  api_factory: Factory) -> None:
    ids = [client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    page = client.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()
    assert [j["id"] for j in page["data"]] == [ids[2]] and page["has_more"] is True
    # The cursor's job is cancelled meanwhile: the next page still follows it.
    client.post(f"/v1/jobs/{ids[2]}/cancel")
    rest = client.get("/v1/jobs", params={"status": "queued", "after": page["next_after"]})
    assert [j["id"] for j in rest.json()["data"]] == [ids[0]]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[2], ids[1]]
    r = client.get("/v1/jobs", params={"status": "sleeping"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "status"
    # queue_position: the one queued job is next; a cancelled one has none.
    job = client.get(f"/v1/jobs/{ids[0]}").json()
    assert job["progress"]["queue_position"] == 1 and job["progress"]["eta_s"] is None
    assert client.get(f"/v1/jobs/{ids[1]}").json()["progress"]["queue_position"] is None
    with session_scope(api_factory) as s:
        assert claim_job(s, ids[0], "w1") is not None
    assert client.get(f"/v1/jobs/{ids[0]}").json()["progress"]["queue_position"] is None
