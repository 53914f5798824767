"""Real faults against the real stack: a Redis server, API and worker processes of each test's
own (so a test can kill, stop or restart any of them), on a SQLite file (and PostgreSQL where
noted).

- a worker's whole process group SIGKILLed at random points, again and again: the job resumes
  each time and every step is recorded exactly once;
- a pool process SIGKILLed: its job is handed back at once (not after the lease) and finished;
- a pool process killed by the kernel's out-of-memory killer (a real memory cgroup): the job
  fails as ``out_of_memory`` after that first death, and the worker takes the next job;
- SIGTERM to a worker: its job is queued again at once and another worker finishes it;
- the same task message delivered twice: the job trains once;
- the Redis server stopped and started again mid-job, and a submission while it is down;
- ``lmforge up`` stopped with SIGTERM while one job runs and one waits, then started again:
  both jobs finish (the embedded Redis kept nothing; the queued sweep enqueues them again).

Settings come from the environment (short leases, sweeps and requeue bounds) so that each
fault is recovered from in seconds; every wait polls with a generous safety-net deadline.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from core.routing import job_route
from core.spec import JobSpec
from lmforge import proctree
from lmforge.processes import (
    EmbeddedServerError,
    RedisServer,
    die_with_parent,
    free_port,
    kill_process_group,
    spawn,
    terminate,
)
from store import apikeys
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.models import Job
from store.queue import QUEUE, CeleryEnqueuer, RedisQueueInspector, make_celery
from store.settings import Settings
from tests.e2e.conftest import (
    SMALL_MODEL,
    SMALL_TRAINING,
    Api,
    deep_merge,
    printed_admin_keys,
    wait_for_admin_key,
)
from tests.support.cluster import DEADLINE_S, wait_for
from tests.test_sweep import enter_cgroup, make_memory_cgroup

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "lmforge.cli"]
BUILTIN = {"dataset": {"builtin": "python-docs"}}


class Stack:
    """A Redis server, an API and any number of workers, as real processes, on one
    database; logs under ``home``."""

    def __init__(self, home: Path, database_url: str, **settings: str) -> None:
        self.home = home
        self.database_url = database_url
        home.mkdir(parents=True, exist_ok=True)
        try:
            self.redis = RedisServer(free_port(), dir=home / "redis").start()
        except EmbeddedServerError as exc:
            pytest.skip(f"no Redis: {exc}")
        self.env = {
            **os.environ,
            "LMFORGE_HOME": str(home),
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis.url,
            "PYTHONUNBUFFERED": "1",
            **settings,
        }
        upgrade_database(database_url)
        self.engine = make_engine(database_url)
        self.factory = make_session_factory(self.engine)
        with session_scope(self.factory) as s:
            key = apikeys.create_key(s, "tester").key
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.api_proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60.0,
                                   headers={"Authorization": f"Bearer {key}"})
        self.api = Api(self, BUILTIN)
        self._started: list[subprocess.Popen[bytes]] = []

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str],
               preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
        with open(self.home / f"{name}.log", "ab") as log:
            if preexec is None:
                proc = spawn(argv, env=self.env, log=log)
            else:  # into a cgroup first; same supervision as spawn()
                pdeath = die_with_parent()

                def _pre() -> None:
                    preexec()
                    pdeath()

                proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=_pre, process_group=0)
        self._started.append(proc)
        return proc

    def start_api(self) -> None:
        self.api_proc = self._spawn("api", [*CLI, "api", "--port", str(self.port),
                                            "--log-level", "warning"])
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            assert self.api_proc.poll() is None, self.logs()
            try:
                if self.client.get("/healthz").status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the API did not start:\n{self.logs()}")

    def start_worker(self, name: str,
                     preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
        proc = self._spawn(name, [*CLI, "worker", "--concurrency", "1",
                                  "--hostname", f"{name}@%h"], preexec)
        self.workers[name] = proc
        return proc

    def kill_worker_group(self, name: str) -> None:
        """SIGKILL the worker's whole process group (main process and pool process) and
        wait until every process of it is gone."""
        proc = self.workers[name]
        tree = proctree.descendants(proc.pid) | {proc.pid}
        kill_process_group(proc)
        proc.wait(60)
        assert proctree.wait_gone(tree) == set()

    def pool_pids(self, name: str) -> set[int]:
        """The worker's pool processes: the direct children of its main process."""
        main = self.workers[name].pid
        out = set()
        for pid in proctree.descendants(main):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == main:
                out.add(pid)
        return out

    def logs(self, lines: int = 80) -> str:
        out = []
        for path in sorted(self.home.glob("*.log")) + sorted(self.home.glob("redis/*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {path.name} -----")
            out.extend(text)
        return "\n".join(out)

    def close(self) -> None:
        self.client.close()
        for proc in reversed(self._started):
            terminate(proc, timeout=30)
            kill_process_group(proc)
        self.redis.stop()
        self.engine.dispose()

    # -- the database, read directly -------------------------------------------------------
    def row(self, job_id: str) -> Job:
        with session_scope(self.factory) as s:
            return s.get_one(Job, job_id, populate_existing=True)

    def worker_of(self, job_id: str) -> str | None:
        with session_scope(self.factory) as s:
            return s.scalar(select(Job.worker_id).where(Job.id == job_id))

    # -- jobs --------------------------------------------------------------------------------
    def spec(self, steps: int, **training: Any) -> dict[str, Any]:
        return {
            "name": "faults",
            **BUILTIN,
            "tokenizer": {"kind": "char"},
            "model": SMALL_MODEL,
            "training": deep_merge(SMALL_TRAINING, {"max_steps": steps, "eval_interval": steps,
                                                    "log_interval": 5, **training}),
        }

    def submit(self, steps: int, **training: Any) -> str:
        response = self.client.post("/v1/jobs", json=self.spec(steps, **training))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def wait_step(self, job_id: str, step: int) -> dict[str, Any]:
        """Until the job runs and has recorded step ``step``."""
        return self.api.wait(job_id, f"running at step {step}",
                             lambda j: j["status"] == "running"
                             and j["progress"]["step"] >= step)

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.api.wait_finished(job_id)

    def assert_exact_metrics(self, job_id: str, steps: int) -> None:
        rows = self.api.metrics(job_id, page_size=1000)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """``make_stack(database_url=None, **env)``: a :class:`Stack` on that database (default:
    a new SQLite file), stopped at the end of the test."""
    stacks: list[Stack] = []

    def make(database_url: str | None = None, **settings: str) -> Stack:
        home = tmp_path / f"stack{len(stacks)}"
        url = database_url or f"sqlite:///{home / 'lmforge.db'}"
        stack = Stack(home, url, **settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


def attempts_of(job: dict[str, Any]) -> list[tuple[int, str]]:
    return [(a["attempt"], a["outcome"]) for a in job["attempt_history"]]


# -- SIGKILL -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_of_the_worker_group_at_random_points_resumes_and_records_each_step_once(
    make_stack: Callable[..., Stack], request: pytest.FixtureRequest, backend: str,
) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    # A short lease so that a dead worker's job is swept within seconds.
    kills, steps, interval = 3, 600, 20
    # The job's spec keeps the default checkpoint settings; the service's resumability bound
    # (LMFORGE_CHECKPOINT_EVERY_STEPS, 1000 steps by default) is scaled down to this
    # test-sized job, as an operator would configure it.
    stack = make_stack(url, LMFORGE_HEARTBEAT_TIMEOUT_S="3", LMFORGE_REQUEUE_AFTER_S="5",
                       LMFORGE_MAX_ATTEMPTS="10",
                       LMFORGE_CHECKPOINT_EVERY_STEPS=str(interval))
    stack.start_api()
    job_id = stack.submit(steps)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    log.warning("kill points: random seed %d", seed)  # shown with a failure
    reached = 0
    for k in range(kills):
        stack.start_worker(f"w{k}")
        # At a random step at least two checkpoints past the last kill, so that the next
        # attempt has a newer checkpoint to resume from.
        target = reached + 2 * interval + rng.randrange(1, 3 * interval)
        job = stack.wait_step(job_id, target)
        reached = job["progress"]["step"]
        stack.kill_worker_group(f"w{k}")
    stack.start_worker("last")
    job = stack.finished(job_id)

    assert job["status"] == "succeeded", (job["error"], stack.logs())
    stack.assert_exact_metrics(job_id, steps)
    assert job["attempts"] == kills + 1
    history = job["attempt_history"]
    assert attempts_of(job) == [(i + 1, "lost") for i in range(kills)] + [(kills + 1,
                                                                         "succeeded")]
    resumed = [a["resumed_from_step"] for a in history]
    assert resumed[0] is None  # the first attempt started from scratch
    for step in resumed[1:]:  # every later one from a periodic checkpoint
        assert step is not None and step > 0 and step % interval == 0
    assert resumed[1:] == sorted(resumed[1:])


def test_a_killed_pool_process_hands_its_job_back_at_once(
    make_stack: Callable[..., Stack],
) -> None:
    # A lease far longer than this test: only the main process's WorkerLostError handling
    # can hand the job back in time.
    stack = make_stack(LMFORGE_HEARTBEAT_TIMEOUT_S="3600")
    stack.start_api()
    stack.start_worker("w")
    steps = 400
    job_id = stack.submit(steps, checkpoint_interval=20)
    stack.wait_step(job_id, 45)
    (pool,) = stack.pool_pids("w")
    os.kill(pool, signal.SIGKILL)

    job = stack.finished(job_id)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert stack.workers["w"].poll() is None  # the same worker, with a new pool process
    assert attempts_of(job) == [(1, "lost"), (2, "succeeded")]
    assert job["attempt_history"][1]["resumed_from_step"] >= 40
    stack.assert_exact_metrics(job_id, steps)


def test_a_job_killed_by_the_oom_killer_fails_as_out_of_memory_and_the_worker_goes_on(
    make_stack: Callable[..., Stack],
) -> None:
    # The worker runs in a memory cgroup of its own, limited to 1.5 GiB: enough for the
    # worker and a small job, not for an LSTM of 2 x 4 x 4096 x 8192 floats (1 GiB of weights,
    # plus their gradients and optimizer state).
    cgroup = make_memory_cgroup(3 * 2**29)
    # The service's own size limit (LMFORGE_MAX_PARAMS, 200 M) would refuse the model at
    # submission; raised here so that the job reaches the worker and meets the OOM killer.
    stack = make_stack(LMFORGE_HEARTBEAT_TIMEOUT_S="3600", LMFORGE_MAX_ATTEMPTS="3",
                       LMFORGE_MAX_PARAMS="1000000000")
    try:
        stack.start_api()
        worker = stack.start_worker("w", preexec=enter_cgroup(cgroup))
        before = cgroup.oom_kills()
        big = stack.client.post("/v1/jobs", json=deep_merge(stack.spec(50), {
            "model": {"embed_dim": 4096, "hidden_dim": 4096, "num_layers": 2}}))
        assert big.status_code == 201, big.text
        big_id = big.json()["id"]
        job = stack.finished(big_id)

        assert job["status"] == "failed", stack.logs()
        error = job["error"]
        assert (error["code"], error["retryable"], error["phase"]) == ("out_of_memory", False,
                                                                       "train")
        assert "out-of-memory killer" in error["message"]
        assert "MiB" in error["message"]
        assert job["attempts"] == 1  # after the first death, not retried to worker_lost
        assert attempts_of(job) == [(1, "out_of_memory")]
        after = cgroup.oom_kills()
        assert before is not None and after is not None and after > before

        small = stack.submit(20)
        done = stack.finished(small)
        assert done["status"] == "succeeded", (done["error"], stack.logs())
        assert worker.poll() is None
    finally:
        stack.close()
        wait_for("the cgroup empty", lambda: not (cgroup.path / "cgroup.procs")
                 .read_text().strip())
        cgroup.path.rmdir()


# -- SIGTERM and duplicates ----------------------------------------------------------------------


def test_sigterm_requeues_the_job_at_once_and_another_worker_finishes_it(
    make_stack: Callable[..., Stack],
) -> None:
    # No sweep can requeue it within this test (an hour's lease): the requeue is the
    # shutdown's own.
    stack = make_stack(LMFORGE_HEARTBEAT_TIMEOUT_S="3600")
    stack.start_api()
    first = stack.start_worker("first")
    steps = 600
    job_id = stack.submit(steps)
    stack.wait_step(job_id, 10)
    taken_by = stack.worker_of(job_id)
    stack.start_worker("second")
    first.send_signal(signal.SIGTERM)
    first.wait(120)

    job = stack.finished(job_id)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert stack.worker_of(job_id) != taken_by
    # A graceful interruption is recorded but not counted toward LMFORGE_MAX_ATTEMPTS.
    assert (job["attempts"], job["interruptions"]) == (2, 1)
    assert attempts_of(job) == [(1, "interrupted"), (2, "succeeded")]
    last = job["attempt_history"][-1]
    assert last["outcome"] == "succeeded" and last["resumed_from_step"] >= 10
    stack.assert_exact_metrics(job_id, steps)


def test_the_same_task_delivered_twice_trains_once(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.start_api()
    stack.start_worker("a")
    stack.start_worker("b")
    steps = 300
    job_id = stack.submit(steps)
    route = job_route(JobSpec.model_validate(stack.spec(steps)))  # the API's route: "cpu"
    CeleryEnqueuer(make_celery(Settings(REDIS_URL=stack.redis.url))).enqueue(job_id, route)

    job = stack.finished(job_id)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert job["attempts"] == 1
    assert attempts_of(job) == [(1, "succeeded")]
    stack.assert_exact_metrics(job_id, steps)
    # Both messages were consumed and acknowledged: none waits, none is held.
    inspector = RedisQueueInspector(stack.redis.url)
    wait_for("both messages acknowledged",
             lambda: set(inspector.queue_lengths([QUEUE, route.queue]).values()) == {0})
    inspector.close()


# -- Redis outages -------------------------------------------------------------------------------


def test_redis_restarted_mid_job_training_goes_on_and_jobs_are_consumed_after(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(LMFORGE_REQUEUE_AFTER_S="5")
    stack.start_api()
    worker = stack.start_worker("w")
    steps = 1200
    job_id = stack.submit(steps)
    at_stop = stack.wait_step(job_id, 10)["progress"]["step"]

    stack.redis.stop()
    # Training goes on and its metrics reach the database while Redis is away (long enough
    # for the worker to notice and fail to reconnect).
    stack.wait_step(job_id, at_stop + 300)
    # A submission while the broker is down answers (never hangs): stored, to be enqueued.
    during = stack.client.post("/v1/jobs", json=stack.spec(30))
    assert during.status_code == 201, during.text
    assert during.json()["enqueued_at"] is None
    stack.redis.start()

    job = stack.finished(job_id)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert job["attempts"] == 1
    stack.assert_exact_metrics(job_id, steps)
    after = stack.submit(30)
    for other in (during.json()["id"], after):
        done = stack.finished(other)
        assert done["status"] == "succeeded", (done["error"], stack.logs())
        stack.assert_exact_metrics(other, 30)
    assert worker.poll() is None  # the same worker, connected again


# -- `lmforge up` stopped and started again ------------------------------------------------------


class Up:
    """`lmforge up` on ``home``; its client sends ``key``, or else the admin key that this
    start printed (the first start on a new home prints one, later starts none)."""

    def __init__(self, home: Path, env: dict[str, str], key: str | None = None) -> None:
        self.port = free_port()
        self.home = home
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60.0)
        with open(home / "up.log", "ab") as log:
            self.proc = subprocess.Popen([*CLI, "up", "--port", str(self.port)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"lmforge up did not become healthy:\n{self.log()}")
        if key is None:
            key = wait_for_admin_key(self.log, lambda: self.proc.poll() is None)
        self.key = key
        self.client.headers["Authorization"] = f"Bearer {key}"

    def log(self) -> str:
        return (self.home / "up.log").read_text(errors="replace")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_lmforge_up_stopped_while_one_job_runs_and_one_waits_finishes_both_after_restart(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(LMFORGE_HOME=str(home), PYTHONUNBUFFERED="1", LMFORGE_REQUEUE_AFTER_S="2",
               LMFORGE_HEARTBEAT_TIMEOUT_S="4")
    steps = 1500
    spec_running = {**BUILTIN, "tokenizer": {"kind": "char"}, "model": SMALL_MODEL,
                    "training": {**SMALL_TRAINING, "max_steps": steps, "eval_interval": steps,
                                 "log_interval": 5}}
    spec_waiting = deep_merge(spec_running, {"training": {"max_steps": 40,
                                                          "eval_interval": 40}})
    up = Up(home, env)
    try:
        running = up.client.post("/v1/jobs", json=spec_running).json()["id"]
        waiting = up.client.post("/v1/jobs", json=spec_waiting).json()["id"]
        wait_for("the first job running", lambda: (
            (j := up.client.get(f"/v1/jobs/{running}").json())["status"] == "running"
            and j["progress"]["step"] >= 10))
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(120) == 0, up.log()
    finally:
        up.close()
    url = f"sqlite:///{(home / 'lmforge.db').resolve()}"
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as s:
        states = {j: s.get_one(Job, j).status.value for j in (running, waiting)}
    engine.dispose()
    assert states == {running: "queued", waiting: "queued"}

    key = up.key
    up = Up(home, env, key)  # a new embedded Redis: it holds no message for either job
    try:
        # The admin key was printed by the first start only (one up.log for both starts).
        assert printed_admin_keys(up.log()) == [key], up.log()
        api = Api(up, BUILTIN)
        for job_id, n in ((running, steps), (waiting, 40)):
            job = api.wait_finished(job_id)
            assert job["status"] == "succeeded", (job["error"], up.log())
            assert [r["step"] for r in api.metrics(job_id, 1000)] == list(range(1, n + 1))
        first = api.job(running)
        assert first["attempt_history"][-1]["resumed_from_step"] >= 10  # resumed, not redone
    finally:
        up.close()
