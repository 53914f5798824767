"""The sweeps (``store.sweep``) against a real Redis and a real SQLite file or PostgreSQL:
orphaned running jobs are handed back with their attempt recorded as lost, queued jobs whose
message is lost are enqueued again, exactly once however many sweepers run at once; and the
out-of-memory classification of a dead pool process (``worker.oom``)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lmforge.processes import EmbeddedServerError, RedisServer, free_port
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.models import Job, JobAttempt, JobStatus, new_id, utcnow
from store.progress import start_attempt
from store.queue import (
    BROKER_SOCKET_TIMEOUT_S,
    DEFAULT_ROUTE,
    PRIORITY_STEPS,
    QUEUE,
    TRAIN_TASK,
    CeleryEnqueuer,
    RedisQueueInspector,
    job_id_of_message,
    make_celery,
)
from store.settings import Settings
from store.sweep import (
    enqueue_jobs,
    lost_queued_jobs,
    sweep_all,
    sweep_orphans,
)
from worker import oom

pytestmark = pytest.mark.timeout(300)

S = JobStatus
SWEEPERS = 4
JOBS = 24


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own on a fixed port, so that it can be stopped and started."""
    try:
        server = RedisServer(free_port(), dir=tmp_path / "redis").start()
    except EmbeddedServerError as exc:
        pytest.skip(f"no Redis: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (f"sqlite:///{tmp_path / 'sweep.db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("postgres_url")))
    upgrade_database(url)
    return url


@dataclass
class Env:
    url: str
    factory: sessionmaker[Session]
    settings: Settings
    redis_url: str
    client: redis.Redis

    def job(self, status: JobStatus = S.QUEUED, **values: Any) -> str:
        job_id = new_id("job")
        with session_scope(self.factory) as s:
            s.add(Job(id=job_id, status=status, spec={}, **{"progress": {"step": 0}, **values}))
        return job_id

    def get(self, job_id: str) -> Job:
        with session_scope(self.factory) as s:
            return s.get_one(Job, job_id)

    def messages(self) -> Counter[str]:
        """How many messages the broker's queue holds for each job."""
        return Counter(job_id_of_message(m) or "?" for m in self.inspector().messages())

    def enqueuer(self) -> CeleryEnqueuer:
        return CeleryEnqueuer(make_celery(self.settings))

    def inspector(self) -> RedisQueueInspector:
        return RedisQueueInspector(self.redis_url)


@pytest.fixture
def env(database_url: str, redis_server: RedisServer, tmp_path: Path) -> Iterator[Env]:
    settings = Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=database_url,
                        REDIS_URL=redis_server.url, LMFORGE_HEARTBEAT_TIMEOUT_S=30,
                        LMFORGE_REQUEUE_AFTER_S=60, LMFORGE_MAX_ATTEMPTS=3)
    engine = make_engine(database_url)
    client = redis.Redis.from_url(redis_server.url)
    yield Env(database_url, make_session_factory(engine), settings, redis_server.url, client)
    client.close()
    engine.dispose()


def ago(seconds: float) -> Any:
    return utcnow() - timedelta(seconds=seconds)


# -- orphans -------------------------------------------------------------------------------------


def test_orphan_sweep_requeues_a_dead_workers_job_and_records_the_lost_attempt(
    env: Env,
) -> None:
    stale = env.job(S.RUNNING, attempts=1, heartbeat_at=ago(31), worker_id="h:1",
                    enqueued_at=ago(600))
    fresh = env.job(S.RUNNING, attempts=1, heartbeat_at=ago(1), worker_id="h:2")
    with session_scope(env.factory) as s:
        start_attempt(s, stale, 1, "h:1")
        start_attempt(s, fresh, 1, "h:2")

    result = sweep_all(env.factory, env.enqueuer(), env.settings)

    assert result.orphans == [stale]
    job = env.get(stale)
    assert (job.status, job.worker_id) == (S.QUEUED, None)
    assert job.enqueued_at is not None and job.enqueued_at > ago(30)  # enqueued just now
    assert env.messages() == Counter({stale: 1})
    assert env.get(fresh).status == S.RUNNING
    with session_scope(env.factory) as s:
        outcomes = dict(s.execute(select(JobAttempt.job_id, JobAttempt.outcome)).all())
    assert outcomes == {stale: "lost", fresh: "running"}


def test_orphan_sweep_fails_a_job_past_max_attempts_with_a_full_worker_lost_error(
    env: Env,
) -> None:
    spent = env.job(S.RUNNING, attempts=3, heartbeat_at=ago(600), progress={"step": 42})
    cancelled = env.job(S.RUNNING, attempts=1, heartbeat_at=None, cancel_requested=True)
    with session_scope(env.factory) as s:
        start_attempt(s, spent, 3, "h:1")
        assert sweep_orphans(s, heartbeat_timeout_s=30, max_attempts=3) == []
    job = env.get(spent)
    assert job.status == S.FAILED
    assert job.error is not None
    assert {k: v for k, v in job.error.items() if k != "message"} == {
        "code": "worker_lost", "retryable": False, "phase": "train", "step": 42}
    assert "3 times" in job.error["message"]
    assert env.get(cancelled).status == S.CANCELLED
    with session_scope(env.factory) as s:
        row = s.get_one(JobAttempt, (spent, 3))
        assert (row.outcome, row.ended_at is not None) == ("lost", True)


def test_an_orphan_whose_enqueue_fails_stays_queued_and_is_enqueued_when_redis_returns(
    env: Env, redis_server: RedisServer,
) -> None:
    stale = env.job(S.RUNNING, attempts=1, heartbeat_at=ago(600))
    redis_server.stop()
    result = sweep_all(env.factory, env.enqueuer(), env.settings)
    assert result.orphans == []
    job = env.get(stale)
    assert (job.status, job.enqueued_at) == (S.QUEUED, None)  # not failed: nothing is lost

    redis_server.start()
    assert sweep_all(env.factory, env.enqueuer(), env.settings, env.inspector(),
                     queued=True).queued == [stale]
    assert env.messages() == Counter({stale: 1})


# -- queued jobs whose message is lost -----------------------------------------------------------


def _deliver_without_ack(env: Env) -> Any:
    """Take the next message from the queue as a worker does (kombu's ack emulation puts it
    in the ``unacked`` hash with its delivery time) and keep it unacknowledged."""
    conn = Connection(env.redis_url, transport_options={"priority_steps": PRIORITY_STEPS})
    queue = conn.SimpleQueue(QUEUE)
    message = queue.get(timeout=10)
    return conn, queue, message


def test_queued_sweep_enqueues_exactly_the_jobs_whose_message_is_lost(env: Env) -> None:
    enqueuer = env.enqueuer()
    never = env.job(enqueued_at=None)                  # the API could not reach the broker
    recent = env.job(enqueued_at=ago(5))               # younger than requeue_after_s
    lost = env.job(enqueued_at=ago(120))               # Redis lost it (a restart)
    waiting = env.job(enqueued_at=ago(120))            # still waiting in the queue
    held = env.job(enqueued_at=ago(120))               # delivered just now, not claimed yet
    abandoned = env.job(enqueued_at=ago(120))          # delivered to a worker that died
    running = env.job(S.RUNNING, enqueued_at=ago(120), heartbeat_at=utcnow(), attempts=1)
    done = env.job(S.SUCCEEDED, enqueued_at=None)
    for job_id in (held, abandoned, waiting):
        enqueuer.enqueue(job_id, DEFAULT_ROUTE)
    conn, queue, first = _deliver_without_ack(env)
    conn2, queue2, second = _deliver_without_ack(env)
    try:
        assert [first.payload[0][0], second.payload[0][0]] == [held, abandoned]  # FIFO
        # The worker holding `abandoned` died long ago: back-date its delivery.
        env.client.zadd("unacked_index", {second.delivery_tag: time.time() - 600})

        assert env.inspector().pending_job_ids(time.time() - 60) == {waiting, held}
        result = sweep_all(env.factory, enqueuer, env.settings, env.inspector(), queued=True)

        assert sorted(result.queued) == sorted([never, lost, abandoned])
        assert env.messages() == Counter({never: 1, lost: 1, abandoned: 1, waiting: 1})
        for job_id in (recent, running, done):
            assert job_id not in result.queued
        assert env.get(never).enqueued_at is not None
        # A second sweep right after finds nothing to do: each is enqueued once.
        again = sweep_all(env.factory, enqueuer, env.settings, env.inspector(), queued=True)
        assert again.enqueued == []
    finally:
        queue.close()
        queue2.close()
        conn.release()
        conn2.release()


def test_queued_sweep_without_an_inspector_takes_only_jobs_never_enqueued(env: Env) -> None:
    never = env.job(enqueued_at=None)
    env.job(enqueued_at=ago(120))
    result = sweep_all(env.factory, env.enqueuer(), env.settings, None, queued=True)
    assert result.queued == [never]


def test_queued_sweep_with_redis_down_fails_fast_and_changes_nothing(
    env: Env, redis_server: RedisServer,
) -> None:
    never = env.job(enqueued_at=None)
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        sweep_all(env.factory, env.enqueuer(), env.settings, env.inspector(), queued=True)
    # Bounded by the configured socket timeouts (generously), never a hang.
    assert time.monotonic() - started < 10 * BROKER_SOCKET_TIMEOUT_S
    assert env.get(never).enqueued_at is None


# -- many sweepers at once -----------------------------------------------------------------------


def _claim_all(url: str, redis_url: str, barrier: Any, out: Any) -> None:
    """One sweeper: find the lost queued jobs, wait for the others, then try to claim and
    enqueue every one of them (in a spawned process or a thread)."""
    settings = Settings(DATABASE_URL=url, REDIS_URL=redis_url, LMFORGE_REQUEUE_AFTER_S=60)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    pending = RedisQueueInspector(redis_url).pending_job_ids(cutoff.timestamp())
    with session_scope(factory) as s:
        ids = lost_queued_jobs(s, cutoff=cutoff, pending=pending)
    barrier.wait(timeout=60)
    enqueued, lost = enqueue_jobs(factory, CeleryEnqueuer(make_celery(settings)), ids,
                                  now=now, cutoff=cutoff)
    out.put((len(ids), enqueued, lost))
    engine.dispose()


def _full_sweep(url: str, redis_url: str, barrier: Any, out: Any) -> None:
    """One sweeper running both sweeps, as a worker's main process does."""
    settings = Settings(DATABASE_URL=url, REDIS_URL=redis_url, LMFORGE_REQUEUE_AFTER_S=60,
                        LMFORGE_HEARTBEAT_TIMEOUT_S=30)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    enqueuer = CeleryEnqueuer(make_celery(settings))
    barrier.wait(timeout=60)
    result = sweep_all(factory, enqueuer, settings, RedisQueueInspector(redis_url), queued=True)
    out.put((0, result.enqueued, result.lost_races))
    engine.dispose()


def _run_sweepers(kind: str, target: Callable[..., None], env: Env) -> list[Any]:
    if kind == "processes":
        ctx = multiprocessing.get_context("spawn")
        barrier: Any = ctx.Barrier(SWEEPERS)
        out: Any = ctx.Queue()
        procs = [ctx.Process(target=target, args=(env.url, env.redis_url, barrier, out))
                 for _ in range(SWEEPERS)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        return results
    import queue as queue_module

    tbarrier = threading.Barrier(SWEEPERS)
    tout: queue_module.Queue[Any] = queue_module.Queue()
    threads = [threading.Thread(target=target, args=(env.url, env.redis_url, tbarrier, tout))
               for _ in range(SWEEPERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [tout.get_nowait() for _ in threads]


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_sweepers_racing_on_every_job_enqueue_each_exactly_once(env: Env, kind: str) -> None:
    jobs = [env.job(enqueued_at=None if i % 2 else ago(600)) for i in range(JOBS)]
    results = _run_sweepers(kind, _claim_all, env)

    # Every sweeper saw every job and tried to claim it after the barrier...
    assert [found for found, _, _ in results] == [JOBS] * SWEEPERS
    for _, enqueued, lost in results:
        assert sorted(enqueued + lost) == sorted(jobs)
    # ...and each job was claimed and enqueued by exactly one of them.
    winners = Counter(j for _, enqueued, _ in results for j in enqueued)
    assert winners == Counter({j: 1 for j in jobs})
    assert env.messages() == Counter({j: 1 for j in jobs})


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_concurrent_full_sweeps_enqueue_orphans_and_lost_jobs_exactly_once(
    env: Env, kind: str,
) -> None:
    orphans = [env.job(S.RUNNING, attempts=1, heartbeat_at=ago(600)) for _ in range(JOBS // 2)]
    lost = [env.job(enqueued_at=None if i % 2 else ago(600)) for i in range(JOBS // 2)]
    for job_id in orphans:
        with session_scope(env.factory) as s:
            start_attempt(s, job_id, 1, "dead:1")
    results = _run_sweepers(kind, _full_sweep, env)

    winners = Counter(j for _, enqueued, _ in results for j in enqueued)
    assert winners == Counter({j: 1 for j in orphans + lost})
    assert env.messages() == Counter({j: 1 for j in orphans + lost})
    with session_scope(env.factory) as s:
        rows = s.execute(select(JobAttempt.outcome)).scalars().all()
        statuses = s.execute(select(Job.status)).scalars().all()
    assert rows == ["lost"] * len(orphans)
    assert statuses == [S.QUEUED] * JOBS


# -- the broker: inspection and publishing that never hang ---------------------------------------


def _enqueuer(redis_server: RedisServer) -> CeleryEnqueuer:
    return CeleryEnqueuer(make_celery(Settings(REDIS_URL=redis_server.url)))


def test_inspector_reads_the_job_id_of_a_real_celery_message(redis_server: RedisServer) -> None:
    job_id = new_id("job")
    _enqueuer(redis_server).enqueue(job_id, DEFAULT_ROUTE)
    raw = RedisQueueInspector(redis_server.url).messages()
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == TRAIN_TASK
    assert job_id in message["headers"]["argsrepr"]
    assert job_id_of_message(raw[0]) == job_id
    # Without a readable body, the argsrepr header still names the job.
    message["body"] = "not base64!"
    assert job_id_of_message(json.dumps(message)) == job_id
    message["headers"]["task"] = "another.task"
    assert job_id_of_message(json.dumps(message)) is None


def test_publishing_to_a_stopped_or_frozen_redis_fails_within_the_socket_timeouts(
    redis_server: RedisServer,
) -> None:
    enqueuer = _enqueuer(redis_server)
    enqueuer.enqueue(new_id("job"), DEFAULT_ROUTE)  # a warm connection, as in a running API
    # Generous: a connect or a read times out after BROKER_SOCKET_TIMEOUT_S, with two
    # publish retries; this bound is far above that and far below "hangs".
    bound = 15 * BROKER_SOCKET_TIMEOUT_S
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the port stays open, nothing answers
    try:
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError or redis's
            enqueuer.enqueue(new_id("job"), DEFAULT_ROUTE)
        assert time.monotonic() - started < bound
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017
        enqueuer.enqueue(new_id("job"), DEFAULT_ROUTE)
    assert time.monotonic() - started < bound


# -- the out-of-memory heuristic -----------------------------------------------------------------


def _sigkilled_process() -> int:
    """Start a real process, SIGKILL it, and return the signal its parent saw."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    return -proc.wait()


def test_oom_heuristic_on_a_real_sigkill_and_a_cgroup_counter_file(tmp_path: Path) -> None:
    """The classification logic on a real SIGKILLed process with a cgroup v2 counter file
    that we write (the real kernel OOM kill is the next test)."""
    cgroup = oom.MemoryCgroup(tmp_path, 2)
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    (tmp_path / "memory.max").write_text(f"{512 * 2**20}\n")
    before = cgroup.oom_kills()
    assert before == 1

    signum = _sigkilled_process()
    assert signum == signal.SIGKILL
    assert not oom.killed_by_oom(signum, before, cgroup.oom_kills())  # counter unchanged

    events.write_text(events.read_text().replace("oom_kill 1", "oom_kill 2"))
    after = cgroup.oom_kills()
    assert oom.killed_by_oom(signum, before, after)
    assert not oom.killed_by_oom(signal.SIGSEGV, before, after)
    assert not oom.killed_by_oom(signum, None, after)
    assert "512 MiB" in oom.describe_oom(123, cgroup, before, after)
    assert oom.exit_signal("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.") == 9
    assert oom.exit_signal("Worker exited prematurely: exitcode 1 Job: 0.") is None


def make_memory_cgroup(limit_bytes: int) -> oom.MemoryCgroup:
    """A new child of this process's memory cgroup with a memory limit, or a skip saying why
    there cannot be one here. The caller removes it (``rmdir``) once it is empty."""
    own = oom.memory_cgroup()
    if own is None:
        pytest.skip("no memory cgroup with an OOM-kill counter for this process")
    child = own.path / f"lmforge-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a child memory cgroup under {own.path}: {exc}")
    try:
        limit_file = "memory.max" if own.version == 2 else "memory.limit_in_bytes"
        (child / limit_file).write_text(str(limit_bytes))
    except OSError as exc:
        child.rmdir()
        pytest.skip(f"cannot set a memory limit on {child}: {exc}")
    return oom.MemoryCgroup(child, own.version)


def enter_cgroup(cgroup: oom.MemoryCgroup) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child into ``cgroup``."""
    procs = str(cgroup.path / "cgroup.procs")

    def _enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    return _enter


def test_a_real_oom_kill_is_recognised_from_sigkill_and_the_cgroup_counter() -> None:
    cgroup = make_memory_cgroup(64 * 2**20)
    try:
        before = cgroup.oom_kills()
        proc = subprocess.Popen(
            [sys.executable, "-c", "x = [bytearray(2**20) for _ in range(1024)]"],
            preexec_fn=enter_cgroup(cgroup),
        )
        signum = -proc.wait(120)
        assert signum == signal.SIGKILL
        after = cgroup.oom_kills()
        assert oom.killed_by_oom(signum, before, after), (before, after)
        assert "64 MiB" in oom.describe_oom(proc.pid, cgroup, before, after)
        assert oom.memory_cgroup() != cgroup  # the test process itself stayed outside
    finally:
        cgroup.path.rmdir()


def test_memory_cgroup_of_this_process_reads_a_counter() -> None:
    cgroup = oom.memory_cgroup()
    if cgroup is None:
        pytest.skip("no memory cgroup with an OOM-kill counter for this process")
    assert isinstance(cgroup.oom_kills(), int)


def test_a_shutdown_requeue_records_its_enqueue_only_for_its_own_attempt(env: Env) -> None:
    """``requeue_interrupted`` sets ``enqueued_at`` in the same UPDATE that queues the job
    (the task then hands its message back), and touches no job it does not requeue."""
    from store.progress import JobLost, requeue_interrupted

    interrupted = env.job(S.RUNNING, attempts=1, enqueued_at=ago(600), heartbeat_at=utcnow())
    other = env.job(S.RUNNING, attempts=2, enqueued_at=None, heartbeat_at=utcnow())
    with session_scope(env.factory) as s:
        requeue_interrupted(s, interrupted, 1)
    with pytest.raises(JobLost), session_scope(env.factory) as s:
        requeue_interrupted(s, other, 1)  # not its attempt
    enqueued_at = env.get(interrupted).enqueued_at
    assert enqueued_at is not None and enqueued_at > ago(60)
    assert env.get(other).enqueued_at is None


def test_a_dead_pool_process_expires_only_its_own_attempts_lease(env: Env) -> None:
    from store.sweep import expire_lease, running_attempt

    job_id = env.job(S.RUNNING, attempts=2, heartbeat_at=utcnow(), worker_id="h:7")
    with session_scope(env.factory) as s:
        assert running_attempt(s, job_id, "h:8") is None  # another process: not its job
        assert running_attempt(s, job_id, "h:7") == 2
        assert not expire_lease(s, job_id, 1)  # an older attempt's death changes nothing
    assert env.get(job_id).heartbeat_at is not None
    with session_scope(env.factory) as s:
        assert expire_lease(s, job_id, 2)
    assert env.get(job_id).heartbeat_at is None
    # The sweep takes it at once, though the lease (30 s) has not run out.
    assert sweep_all(env.factory, env.enqueuer(), env.settings).orphans == [job_id]


def test_an_oom_killed_attempt_fails_the_job_or_cancels_it_if_asked(env: Env) -> None:
    from store.sweep import fail_attempt

    error = {"code": "out_of_memory", "message": "killed", "retryable": False,
             "phase": "train"}
    oom_job = env.job(S.RUNNING, attempts=1, heartbeat_at=utcnow(), progress={"step": 7})
    asked = env.job(S.RUNNING, attempts=1, heartbeat_at=utcnow(), cancel_requested=True)
    with session_scope(env.factory) as s:
        start_attempt(s, oom_job, 1, "h:1")
        assert fail_attempt(s, oom_job, 2, error, "out_of_memory") is None  # not that attempt
        assert fail_attempt(s, oom_job, 1, error, "out_of_memory") == S.FAILED
        assert fail_attempt(s, asked, 1, error, "out_of_memory") == S.CANCELLED
    assert env.get(oom_job).error == {**error, "step": 7}
    with session_scope(env.factory) as s:
        assert s.get_one(JobAttempt, (oom_job, 1)).outcome == "out_of_memory"


def test_graceful_interruptions_do_not_count_toward_max_attempts(env: Env) -> None:
    """Three attempts, one of them handed back by a graceful shutdown: two count, so with
    ``max_attempts`` 3 the orphan is queued again rather than failed."""
    job_id = env.job(S.RUNNING, attempts=3, heartbeat_at=ago(600))
    with session_scope(env.factory) as s:
        s.get_one(Job, job_id).interruptions = 1
    with session_scope(env.factory) as s:
        assert sweep_orphans(s, heartbeat_timeout_s=30, max_attempts=3) == [job_id]
    assert env.get(job_id).status == S.QUEUED
    with session_scope(env.factory) as s:
        s.get_one(Job, job_id).status = S.RUNNING
        s.get_one(Job, job_id).attempts = 4
        s.get_one(Job, job_id).heartbeat_at = ago(600)
    with session_scope(env.factory) as s:  # now three count
        assert sweep_orphans(s, heartbeat_timeout_s=30, max_attempts=3) == []
    job = env.get(job_id)
    assert job.status == S.FAILED and job.error is not None
    assert job.error["code"] == "worker_lost" and "3 times" in job.error["message"]
