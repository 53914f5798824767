"""Job events through a real ``redis-server`` of this test's own (stopped and started again):
the publisher (entries after commit only, MAXLEN, expiry after the terminal status, never
blocking or raising while Redis is down, one warning per outage, a ``resync`` entry after it)
and an API stream in this process that falls back to the database while Redis is down and
goes back to Redis after, with no step lost or sent twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.deps import get_enqueuer
from app.main import create_app
from lmforge.processes import EmbeddedServerError, RedisServer, free_port
from store import events
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.models import Job, JobStatus, new_id
from store.progress import claim_job, finish_job, record_metrics
from store.settings import Settings
from tests.api.conftest import CORPUS, RecordingEnqueuer, bearer, create_key, small_spec
from tests.api.test_events import Reader, _row
from tests.support.uvicorn_thread import ThreadedServer

# Safety net for events that must arrive, not a measured bound.
DEADLINE_S = 60.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(free_port(), dir=tmp_path / "redis").start()
    except EmbeddedServerError as exc:
        pytest.skip(f"no Redis: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, own_redis: RedisServer) -> Iterator[Settings]:
    s = Settings(LMFORGE_HOME=tmp_path / "home",
                 DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}", REDIS_URL=own_redis.url,
                 LMFORGE_RATE_LIMIT_PER_MINUTE=0, LMFORGE_EVENTS_MAXLEN=100,
                 LMFORGE_EVENTS_TTL_S=120, LMFORGE_EVENTS_POLL_S=0.05,
                 LMFORGE_EVENTS_HEARTBEAT_S=0.5)
    events.configure(s)
    yield s
    events.configure(None)


def _job(settings: Settings) -> tuple[Any, str]:
    """A session factory on the settings' database and a claimed job in it."""
    upgrade_database(settings.sqlalchemy_url)
    factory = make_session_factory(make_engine(settings.sqlalchemy_url))
    with session_scope(factory) as s:
        job = Job(id=new_id("job"), spec={}, status=JobStatus.QUEUED, progress={}, name="j")
        s.add(job)
        s.flush()
        job_id = job.id
    with session_scope(factory) as s:
        assert claim_job(s, job_id, "w1") is not None
    return factory, job_id


def _entries(r: redis.Redis, job_id: str) -> list[dict[str, str]]:
    """The fields of each entry of the job's Redis stream, oldest first."""
    found: Any = r.xrange(events.stream_key(job_id))
    return [fields for _id, fields in found]


def test_the_publisher_writes_after_commit_caps_and_expires_the_stream(
    settings: Settings, own_redis: RedisServer
) -> None:
    factory, job_id = _job(settings)
    pub = events.publisher(settings)
    with pytest.raises(RuntimeError), session_scope(factory) as s:
        record_metrics(s, job_id, 1, [_row(1)])
        raise RuntimeError("rolled back")
    for first in range(1, 301, 10):  # 30 flushes of 10 rows
        with session_scope(factory) as s:
            record_metrics(s, job_id, 1, [_row(i) for i in range(first, first + 10)])
    with session_scope(factory) as s:
        finish_job(s, job_id, 1, JobStatus.SUCCEEDED, result={})
    assert pub.flush()
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    entries = _entries(r, job_id)
    kinds = [e["event"] for e in entries]
    # The rolled-back flush is not there; the claim's status, 30 flushes, the end.
    assert kinds == ["status"] + ["metrics"] * 30 + ["status"]
    assert float(entries[1]["t"]) <= time.time()
    assert 0 < r.ttl(events.stream_key(job_id)) <= 120  # LMFORGE_EVENTS_TTL_S after the end
    # MAXLEN ~ 100: a longer stream is trimmed (Redis trims whole nodes, so "about").
    for i in range(400):
        pub.publish(job_id, "metrics", [{"step": 1000 + i, "values": {}}])
    assert pub.flush()
    assert 100 <= r.xlen(events.stream_key(job_id)) < 300
    r.close()


def test_publishing_while_redis_is_down_never_blocks_logs_once_and_resyncs_after(
    settings: Settings, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    factory, job_id = _job(settings)
    pub = events.publisher(settings)
    assert pub.flush()
    own_redis.stop()
    caplog.set_level(logging.WARNING, logger="store.events")
    for first in range(1, 200, 10):  # the job goes on: every commit succeeds
        with session_scope(factory) as s:
            record_metrics(s, job_id, 1, [_row(i) for i in range(first, first + 10)])
    assert pub.flush()
    assert pub.dropped >= 1
    warnings = [r for r in caplog.records if "not published" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    own_redis.start()
    deadline = time.monotonic() + DEADLINE_S
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    while True:  # the publisher tries again after events.RETRY_AFTER_S
        with session_scope(factory) as s:
            record_metrics(s, job_id, 1, [_row(500)])
        assert pub.flush()
        kinds = [e["event"] for e in _entries(r, job_id)]
        if kinds:
            break
        assert time.monotonic() < deadline, "the publisher did not reach Redis again"
        time.sleep(0.2)
    # Redis restarted empty (no persistence): its first entry for the job says "read the
    # database", then the event.
    assert kinds[:2] == ["resync", "metrics"]
    r.close()


def test_a_stream_reads_the_database_while_redis_is_down_and_redis_after(
    settings: Settings, own_redis: RedisServer
) -> None:
    app = create_app(settings)
    enqueuer = RecordingEnqueuer()
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with ThreadedServer(app) as server:
        factory = app.state.session_factory
        headers = bearer(create_key(factory, "tester"))
        ds = httpx.post(f"{server.url}/v1/datasets", headers=headers,
                        files={"file": ("c.txt", CORPUS.encode(), "text/plain")}).json()["id"]
        job_id = httpx.post(f"{server.url}/v1/jobs", headers=headers,
                            json=small_spec(ds)).json()["id"]
        with session_scope(factory) as s:
            assert claim_job(s, job_id, "w1") is not None

        def flush(first: int, n: int = 5) -> None:
            with session_scope(factory) as s:
                record_metrics(s, job_id, 1, [_row(i) for i in range(first, first + n)])

        url = f"{server.url}/v1/jobs/{job_id}/events"
        with httpx.stream("GET", url, headers=headers, timeout=DEADLINE_S) as resp:
            reader = Reader(resp)
            got = reader.until(lambda e: e.event == "status")
            health = httpx.get(f"{server.url}/healthz/events").json()
            assert health == {"open_streams": 1, "redis_connections": 1}  # live via Redis
            flush(1)
            got += reader.until(lambda e: e.id == "5")
            own_redis.stop()  # the stream falls back to reading the database
            flush(6)
            got += reader.until(lambda e: e.id == "10")
            health = httpx.get(f"{server.url}/healthz/events").json()
            assert health == {"open_streams": 1, "redis_connections": 0}
            own_redis.start()
            # Within REDIS_RETRY_S the stream is back on Redis; meanwhile rows keep coming.
            first = 11
            deadline = time.monotonic() + DEADLINE_S
            while httpx.get(f"{server.url}/healthz/events").json()["redis_connections"] == 0:
                assert time.monotonic() < deadline, "the stream did not go back to Redis"
                flush(first)
                got += reader.until(lambda e, last=first + 4: e.id == str(last))
                first += 5
            flush(first)
            got += reader.until(lambda e, last=first + 4: e.id == str(last))
            with session_scope(factory) as s:
                finish_job(s, job_id, 1, JobStatus.SUCCEEDED, result={})
            got += reader.until(lambda e: e.event == "status" and e.data["status"] != "running")
    steps = [int(e.id) for e in got if e.event == "metrics" and e.id]
    assert steps == list(range(1, first + 5))
    assert got[-1].data["status"] == "succeeded"
