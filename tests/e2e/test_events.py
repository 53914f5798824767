"""The event stream on the real service: a Redis server, the API and workers as processes
(tests/e2e/test_faults.py's :class:`Stack`). A running job's events arrive through Redis in
order, none missing and none twice, across a reconnect with ``Last-Event-ID`` in the middle
and across a worker killed with SIGKILL whose job another worker resumes from a checkpoint
(replaying steps); connect/abort cycles leave the API's open streams and Redis's clients at
their baseline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from app.events import STREAM_CLIENT_NAME
from tests.e2e.test_faults import Stack, make_stack  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

# A safety net, not an assertion about speed.
DEADLINE_S = 180.0
TERMINAL = {"succeeded", "failed", "cancelled"}
TIMING = {"elapsed_s", "tokens_per_s"}


@dataclass
class Event:
    event: str
    id: str | None
    data: Any


class Reader:
    """Reads events off an open streaming response, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()

    def next(self) -> Event:
        fields: dict[str, str] = {}
        for line in self.lines:
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:
                return Event(fields["event"], fields.get("id"), json.loads(fields["data"]))
        raise EOFError("the stream ended")

    def until(self, pred: Callable[[Event], bool]) -> list[Event]:
        got = [self.next()]
        while not pred(got[-1]):
            got.append(self.next())
        return got


@contextmanager
def events(stack: Stack, job_id: str, last_id: str | None = None) -> Iterator[Reader]:
    headers = {} if last_id is None else {"Last-Event-ID": last_id}
    with stack.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                             timeout=DEADLINE_S) as r:
        assert r.status_code == 200, r.read()
        yield Reader(r)


def at_step(n: int) -> Callable[[Event], bool]:
    return lambda e: e.event == "metrics" and e.data["step"] >= n


def is_terminal(e: Event) -> bool:
    return e.event == "status" and e.data["status"] in TERMINAL


def wait_for(what: str, pred: Callable[[], Any]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_live_events_arrive_once_in_order_across_a_reconnect_and_a_killed_worker(
    make_stack: Callable[..., Stack],  # noqa: F811
) -> None:
    interval, steps = 20, 600
    stack = make_stack(LMFORGE_HEARTBEAT_TIMEOUT_S="3", LMFORGE_REQUEUE_AFTER_S="5",
                       LMFORGE_MAX_ATTEMPTS="10", LMFORGE_CHECKPOINT_EVERY_STEPS=str(interval))
    stack.start_api()
    stack.start_worker("w0")
    job_id = stack.submit(steps)
    with events(stack, job_id) as reader:
        first = reader.until(at_step(60))
        # Live delivery goes through Redis: the stream holds a connection to it.
        assert stack.client.get("/healthz/events").json() == {"open_streams": 1,
                                                              "redis_connections": 1}
    last_id = next(e.id for e in reversed(first) if e.id is not None)
    with events(stack, last_id=last_id, job_id=job_id) as reader:
        second = reader.until(at_step(3 * interval + 90))
        seen_before_kill = second[-1].data["step"]
        stack.kill_worker_group("w0")
        stack.start_worker("w1")
        second += reader.until(is_terminal)
        with pytest.raises(EOFError):
            reader.next()  # closed by the server after the terminal status
    got = first + second
    assert got[-1].data["status"] == "succeeded", stack.logs()
    job = stack.finished(job_id)
    # The job was resumed from a checkpoint before the steps the client had seen: steps
    # were replayed by the second attempt.
    resumed = job["attempt_history"][1]["resumed_from_step"]
    assert job["attempts"] == 2 and resumed is not None and resumed < seen_before_kill, job
    metrics = [e for e in got if e.event == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(1, steps + 1))
    assert [e.id for e in metrics] == [str(e.data["step"]) for e in metrics]
    # The rows are the stored rows (a replayed row differs only in its timings).
    stored = stack.api.metrics(job_id, page_size=1000)
    assert [{k: v for k, v in e.data.items() if k not in TIMING} for e in metrics] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in stored]
    assert not [e for e in got if e.event == "warning"
                and e.data["code"] == "replayed_step_differs"]
    ckpts = [e.data["id"] for e in got if e.event == "checkpoint"]
    assert len(ckpts) == len(set(ckpts)) >= steps // interval
    statuses = [(e.data["status"], e.data["attempt"]) for e in got if e.event == "status"]
    assert statuses[0] in (("queued", 0), ("running", 1))
    assert ("running", 1) in statuses and ("running", 2) in statuses
    assert statuses[-1] == ("succeeded", 2)


def _stream_clients(r: redis.Redis) -> int:
    return sum(1 for c in r.client_list() if c.get("name") == STREAM_CLIENT_NAME)


def test_disconnects_return_open_streams_redis_clients_and_quota_slots_to_baseline(
    make_stack: Callable[..., Stack],  # noqa: F811
) -> None:
    stack = make_stack(LMFORGE_QUOTA_STREAMS="2")
    stack.start_api()  # no worker: the job stays queued, its stream stays open
    job_id = stack.submit(50)
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        with events(stack, job_id) as reader:  # warm-up: the API's own connections exist
            assert reader.next().data["status"] == "queued"
            assert _stream_clients(r) == 1
        wait_for("the warm-up stream closed", lambda: _stream_clients(r) == 0)
        baseline_clients = len(r.client_list())
        assert stack.client.get("/healthz/events").json() == {"open_streams": 0,
                                                              "redis_connections": 0}
        for i in range(40):
            with events(stack, job_id) as reader:
                if i % 2:  # half of them aborted before the first event was read
                    reader.next()
        wait_for("streams and Redis clients back to their baseline", lambda: (
            stack.client.get("/healthz/events").json()["open_streams"] == 0
            and _stream_clients(r) == 0 and len(r.client_list()) == baseline_clients))
        assert stack.client.get("/healthz/events").json() == {"open_streams": 0,
                                                              "redis_connections": 0}
        # Every quota slot is free again: LMFORGE_QUOTA_STREAMS=2 streams open, a third 429.
        with events(stack, job_id) as a, events(stack, job_id) as b:
            assert a.next().event == b.next().event == "status"
            third = stack.client.get(f"/v1/jobs/{job_id}/events")
            assert third.status_code == 429, third.text
    finally:
        r.close()
