"""``GET /v1/jobs/{id}/events`` in process, without Redis (the stream reads the database):
history, resume by ``Last-Event-ID`` and ``after_step``, the end after the terminal status,
headers, ownership, the stream quota, live events, heartbeats, and disconnects that free every
slot. Finished jobs go through ``TestClient`` (the stream ends by itself); running ones
through a real uvicorn on a socket of its own, read with httpx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app import quotas
from app.deps import get_enqueuer
from app.events import JobEventStream, Position, open_streams
from app.main import create_app
from core.contract import CheckpointBlob, StepMetrics
from core.contract import CheckpointKind as K
from store import events as store_events
from store.db import session_scope
from store.models import JobStatus
from store.progress import (
    claim_job,
    finish_job,
    prepare_resume,
    record_checkpoint,
    record_metrics,
    requeue_interrupted,
)
from store.settings import Settings
from tests.api.conftest import CORPUS, RecordingEnqueuer, bearer, create_key, small_spec
from tests.support.uvicorn_thread import ThreadedServer

Factory = sessionmaker[Session]
# Nothing listens on port 1: the stream finds Redis unreachable and reads the database.
NO_REDIS = "redis://127.0.0.1:1/0"
# Safety net for events that must arrive, not a measured bound.
DEADLINE_S = 60.0
WARNING = {"code": "fresh_state_gap", "message": "from a fresh (zero) hidden state ..."}


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
                 REDIS_URL=NO_REDIS, LMFORGE_RATE_LIMIT_PER_MINUTE=0,
                 LMFORGE_EVENTS_HEARTBEAT_S=0.3, LMFORGE_EVENTS_POLL_S=0.05,
                 LMFORGE_QUOTA_STREAMS=2)
    store_events.configure(s)  # what this process's commits publish (to no Redis)
    yield s
    store_events.configure(None)


# -- reading SSE ------------------------------------------------------------------------------


@dataclass
class Event:
    event: str
    id: str | None
    data: Any


def parse(text: str) -> tuple[list[Event], int]:
    """The events of an SSE body and the number of comment blocks (heartbeats)."""
    events, comments = [], 0
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln]
        if not lines:
            continue
        if all(ln.startswith(":") for ln in lines):
            comments += 1
            continue
        fields: dict[str, str] = {}
        for ln in lines:
            name, _, value = ln.partition(": ")
            fields[name] = value
        events.append(Event(fields["event"], fields.get("id"), json.loads(fields["data"])))
    return events, comments


def _row(step: int, val: float | None = None) -> StepMetrics:
    return StepMetrics(step=step, epoch=step / 10, train_loss=3.0 - step / 100, lr=1e-3,
                       grad_norm=1.0, tokens_per_s=100.0, elapsed_s=step * 0.1,
                       tokens_seen=step * 36, val_loss=val, val_ppl=None if val is None else 9.0)


def _metrics(factory: Factory, job_id: str, steps: range, attempt: int = 1) -> None:
    with session_scope(factory) as s:
        record_metrics(s, job_id, attempt, [_row(i) for i in steps])


def _checkpoint(factory: Factory, storage: Any, job_id: str, step: int, kind: K = K.PERIODIC,
                attempt: int = 1) -> str:
    with session_scope(factory) as s:
        row, _ = record_checkpoint(s, storage, job_id, attempt,
                                   CheckpointBlob(kind, step, b"w" * 64, {"step": step}), 5)
        return row.id


def _finish(factory: Factory, job_id: str, status: JobStatus = JobStatus.SUCCEEDED,
            error: dict[str, Any] | None = None, attempt: int = 1) -> None:
    with session_scope(factory) as s:
        finish_job(s, job_id, attempt, status, result={"warnings": [WARNING]}, error=error)


@pytest.fixture
def running(client: TestClient, dataset_id: str, session_factory: Factory) -> str:
    job_id = str(client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"])
    with session_scope(session_factory) as s:
        assert claim_job(s, job_id, "w1") is not None
    return job_id


@pytest.fixture
def finished(client: TestClient, running: str, session_factory: Factory) -> dict[str, Any]:
    """A succeeded job: metric rows 1-5, a periodic checkpoint at 3 and a last one at 5, a
    fresh_state_gap warning in its result."""
    storage = client.app.state.storage  # type: ignore[attr-defined]
    _metrics(session_factory, running, range(1, 4))
    c3 = _checkpoint(session_factory, storage, running, 3)
    _metrics(session_factory, running, range(4, 6))
    c5 = _checkpoint(session_factory, storage, running, 5, K.LAST)
    _finish(session_factory, running)
    return {"id": running, "c3": c3, "c5": c5}


# -- a finished job ---------------------------------------------------------------------------


def test_a_finished_jobs_stream_is_its_history_warnings_and_final_status_then_it_ends(
    client: TestClient, finished: dict[str, Any]
) -> None:
    j = f"/v1/jobs/{finished['id']}"
    r = client.get(f"{j}/events")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    events, _ = parse(r.text)
    c3, c5 = finished["c3"], finished["c5"]
    assert [(e.event, e.id) for e in events] == [
        ("metrics", "1"), ("metrics", "2"), ("metrics", "3"), ("checkpoint", f"3:{c3}"),
        ("metrics", "4"), ("metrics", "5"), ("checkpoint", f"5:{c5}"),
        ("warning", None), ("status", None)]
    # The rows exactly as the list routes give them.
    rows = client.get(f"{j}/metrics").json()["data"]
    assert [e.data for e in events if e.event == "metrics"] == rows
    ckpts = {c["id"]: c for c in client.get(f"{j}/checkpoints").json()["data"]}
    assert [e.data for e in events if e.event == "checkpoint"] == [ckpts[c3], ckpts[c5]]
    assert events[-2].data == WARNING
    assert events[-1].data == {"status": "succeeded", "attempt": 1, "cancel_requested": False,
                               "error": None}


def test_a_failed_jobs_final_status_carries_its_error(
    client: TestClient, running: str, session_factory: Factory
) -> None:
    error = {"code": "non_finite_loss", "message": "the loss became NaN", "retryable": False,
             "phase": "train", "step": 2}
    _metrics(session_factory, running, range(1, 3))
    _finish(session_factory, running, JobStatus.FAILED, error)
    events, _ = parse(client.get(f"/v1/jobs/{running}/events").text)
    assert [e.event for e in events] == ["metrics", "metrics", "warning", "status"]
    assert events[-1].data == {"status": "failed", "attempt": 1, "cancel_requested": False,
                               "error": error}


def test_a_cancelled_queued_job_ends_at_once(client: TestClient, dataset_id: str) -> None:
    job_id = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    events, _ = parse(client.get(f"/v1/jobs/{job_id}/events").text)
    assert [(e.event, e.data["status"]) for e in events] == [("status", "cancelled")]


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "query", "expected"), [
    ("3", None, ["ckpt3", "4", "5", "ckpt5"]),  # step 3 seen, its checkpoint not yet
    ("3:{c3}", None, ["4", "5", "ckpt5"]),
    (None, 4, ["5", "ckpt5"]),
    ("4", 1, ["5", "ckpt5"]),  # the header wins
    ("5:{c5}", None, []),
    ("9999999999", None, []),  # past any step a job can have: after all of them
    ("0", None, ["1", "2", "3", "ckpt3", "4", "5", "ckpt5"]),
])
def test_resume_sends_exactly_what_comes_after_the_position(
    client: TestClient, finished: dict[str, Any], header: str | None, query: int | None,
    expected: list[str],
) -> None:
    headers = {} if header is None else {"Last-Event-ID": header.format(**finished)}
    params = {} if query is None else {"after_step": query}
    r = client.get(f"/v1/jobs/{finished['id']}/events", headers=headers, params=params)
    events, _ = parse(r.text)
    names = {finished["c3"]: "ckpt3", finished["c5"]: "ckpt5"}
    got = [e.id if e.event == "metrics" else names[e.data["id"]] for e in events
           if e.event in ("metrics", "checkpoint")]
    assert got == expected
    assert [e.event for e in events][-2:] == ["warning", "status"]


@pytest.mark.parametrize("bad", ["x", "-1", "3:", "3:ckpt_zz", "99999999999", "1.5", "0" * 200])
def test_a_malformed_last_event_id_is_a_422_naming_it(
    client: TestClient, finished: dict[str, Any], bad: str
) -> None:
    r = client.get(f"/v1/jobs/{finished['id']}/events", headers={"Last-Event-ID": bad})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "Last-Event-ID"


def test_a_negative_after_step_is_a_422_naming_it(
    client: TestClient, finished: dict[str, Any]
) -> None:
    r = client.get(f"/v1/jobs/{finished['id']}/events", params={"after_step": -1})
    assert r.status_code == 422
    assert "after_step" in r.text


# -- ownership --------------------------------------------------------------------------------


def test_another_principals_job_is_404_and_an_admin_sees_it(
    client: TestClient, finished: dict[str, Any], session_factory: Factory
) -> None:
    path = f"/v1/jobs/{finished['id']}/events"
    other = bearer(create_key(session_factory, "bob"))
    r = client.get(path, headers=other)
    missing = client.get("/v1/jobs/job_" + "0" * 32 + "/events", headers=other)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    admin = bearer(create_key(session_factory, "root", admin=True))
    events, _ = parse(client.get(path, headers=admin).text)
    assert events[-1].data["status"] == "succeeded"
    assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401


# -- replayed steps ---------------------------------------------------------------------------


def test_a_replayed_step_is_not_sent_again_and_a_differing_one_is_a_warning(
    settings: Settings,
) -> None:
    stream = JobEventStream("job_x", None, settings, Position())  # type: ignore[arg-type]
    row = _row(7).as_dict()
    values = {k: v for k, v in row.items() if k != "step"}
    first = stream._metric_event(7, values)
    assert first is not None and first.startswith(b"event: metrics\nid: 7\n")
    # Replayed with new timings only: nothing.
    assert stream._metric_event(7, {**values, "elapsed_s": 99.0, "tokens_per_s": 1.0}) is None
    # Replayed with another loss: a warning naming the step, once.
    warned = stream._metric_event(7, {**values, "train_loss": 1.0})
    assert warned is not None and warned.startswith(b"event: warning\n")
    assert json.loads(warned.split(b"data: ")[1])["step"] == 7
    assert stream._metric_event(7, {**values, "train_loss": 1.0}) is None
    assert stream._metric_event(6, values) is None  # before the position, never sent: skipped


# -- live, on a real server -------------------------------------------------------------------


@dataclass
class Live:
    url: str
    headers: dict[str, str]
    factory: Factory
    storage: Any
    job_id: str

    def stream(self, **kw: Any) -> Any:
        return httpx.stream("GET", f"{self.url}/v1/jobs/{self.job_id}/events",
                            headers={**self.headers, **kw.pop("headers", {})},
                            timeout=DEADLINE_S, **kw)


@pytest.fixture
def live(settings: Settings) -> Iterator[Live]:
    app = create_app(settings)
    enqueuer = RecordingEnqueuer()
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with ThreadedServer(app) as server:
        factory: Factory = app.state.session_factory
        key = create_key(factory, "tester")
        headers = bearer(key)
        ds = httpx.post(f"{server.url}/v1/datasets", headers=headers,
                        files={"file": ("c.txt", CORPUS.encode(), "text/plain")})
        assert ds.status_code == 201, ds.text
        job = httpx.post(f"{server.url}/v1/jobs", headers=headers,
                         json=small_spec(ds.json()["id"])).json()
        with session_scope(factory) as s:
            assert claim_job(s, job["id"], "w1") is not None
        yield Live(server.url, headers, factory, app.state.storage, job["id"])


class Reader:
    """Reads events off an open streaming response, one at a time."""

    def __init__(self, response: Any) -> None:
        self.lines = response.iter_lines()
        self.comments = 0

    def next(self) -> Event:
        fields: dict[str, str] = {}
        for line in self.lines:
            if line.startswith(":"):
                self.comments += 1
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:
                return Event(fields["event"], fields.get("id"), json.loads(fields["data"]))
        raise EOFError("the stream ended")

    def until(self, pred: Any) -> list[Event]:
        got: list[Event] = []
        while not got or not pred(got[-1]):
            got.append(self.next())
        return got


def _wait_for(pred: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_live_events_arrive_in_order_across_a_reconnect_and_a_worker_resume(
    live: Live,
) -> None:
    f, job = live.factory, live.job_id
    _metrics(f, job, range(1, 6))
    seen: list[Event] = []
    with live.stream() as r:
        reader = Reader(r)
        first = reader.next()
        assert (first.event, first.data["status"]) == ("status", "running")
        seen += reader.until(lambda e: e.id == "5")
        c5 = _checkpoint(f, live.storage, job, 5)
        _metrics(f, job, range(6, 13))
        seen += reader.until(lambda e: e.id == "12")
    assert [e.id for e in seen if e.event == "metrics"] == [str(i) for i in range(1, 13)]
    assert [(e.id, e.data["id"]) for e in seen if e.event == "checkpoint"] == [(f"5:{c5}", c5)]
    # The worker stops at step 12 (its checkpoint at 5) and the job is resumed: it reports
    # steps 6-12 again, then goes on.
    with session_scope(f) as s:
        requeue_interrupted(s, job, 1)
    with session_scope(f) as s:
        assert claim_job(s, job, "w2") is not None
    with session_scope(f) as s:
        prepare_resume(s, live.storage, job)
    with live.stream(headers={"Last-Event-ID": "9"}) as r:
        reader = Reader(r)
        again = [reader.next()]  # the status: running, attempt 2
        _metrics(f, job, range(6, 16), attempt=2)  # the replay, then new steps
        again += reader.until(lambda e: e.id == "15")
        _finish(f, job, attempt=2)
        again += reader.until(lambda e: e.event == "status" and e.data["status"] == "succeeded")
        with pytest.raises(EOFError):
            reader.next()  # the server closed the stream after the terminal status
    steps = [int(e.id) for e in again if e.event == "metrics" and e.id]
    assert steps == list(range(10, 16)), steps  # after 9, no gap, none twice
    statuses = [(e.data["status"], e.data["attempt"]) for e in again if e.event == "status"]
    assert statuses[0] == ("running", 2) and statuses[-1] == ("succeeded", 2)
    assert [e.data for e in again if e.event == "warning"] == [WARNING]


def test_an_idle_stream_sends_heartbeats_and_a_cancel_is_a_status_event(live: Live) -> None:
    with live.stream() as r:
        reader = Reader(r)
        assert reader.next().data["cancel_requested"] is False
        for line in reader.lines:  # LMFORGE_EVENTS_HEARTBEAT_S=0.3: comments while idle
            assert not line or line == ": heartbeat", line
            if reader.comments == 2:
                break
            reader.comments += line == ": heartbeat"
        cancel = httpx.post(f"{live.url}/v1/jobs/{live.job_id}/cancel", headers=live.headers)
        assert cancel.status_code == 202
        event = reader.until(lambda e: e.event == "status")[-1]
        assert (event.data["status"], event.data["cancel_requested"]) == ("running", True)
        _finish(live.factory, live.job_id, JobStatus.CANCELLED)
        end = reader.until(lambda e: e.event == "status")
        assert end[-1].data["status"] == "cancelled"


def test_the_stream_quota_is_429_and_disconnects_free_every_slot(live: Live) -> None:
    baseline = open_streams()
    assert baseline == {"open_streams": 0, "redis_connections": 0}
    # Two streams (LMFORGE_QUOTA_STREAMS=2) are open; a third is refused.
    with live.stream() as a, live.stream() as b:
        # (Each Reader is kept: a dropped iterator closes its connection.)
        ra, rb = Reader(a), Reader(b)
        assert ra.next().event == rb.next().event == "status"
        third = httpx.get(f"{live.url}/v1/jobs/{live.job_id}/events", headers=live.headers)
        assert third.status_code == 429, third.text
        assert third.json()["error"]["code"] == "quota_exceeded"
        assert httpx.get(f"{live.url}/healthz/events").json()["open_streams"] == 2
    # Many connect/abort cycles, some aborted before the first event was read.
    for i in range(30):
        with live.stream() as r:
            if i % 2:
                Reader(r).next()
    _wait_for(lambda: open_streams() == baseline and quotas._streams == {},
              f"streams left open: {open_streams()}, slots {quotas._streams}")
    assert httpx.get(f"{live.url}/healthz/events").json() == baseline
    # The slots are free: two streams open again.
    with live.stream() as a, live.stream() as b:
        ra, rb = Reader(a), Reader(b)
        assert ra.next().event == rb.next().event == "status"
