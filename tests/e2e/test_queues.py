"""Queues and devices (issue 11; docs/deploy.md, "Queues and devices"), with real processes:
a real Redis, the API and ``lmforge worker`` processes on one SQLite database.

- A job that needs "cuda" goes to the ``cuda`` queue: a CPU-only worker never takes it, the
  API shows it ``queued`` with ``waiting_for: "cuda"``, and a worker that serves ``cuda``
  takes it once started (on this CPU-only machine it then fails with ``device_unavailable``,
  which is the routing shown end to end).
- ``priority``: with no worker running, a low then a high priority job on one queue; one
  worker of concurrency 1 starts the high one first.
- ``lmforge worker --gpus 0,1``: two worker processes with ``CUDA_VISIBLE_DEVICES`` 0 and 1
  (read from /proc/<pid>/environ and from the worker registry), both gone after SIGTERM;
  ``--gpus 0,1,2,3 --gpus-per-job 2`` makes two of two GPUs each on the ``-x2`` queues.
- The queued sweep sends a lost message again to the job's own queue and priority, and sees
  messages on every queue a queued job routes to.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from app.metricseries import queue_positions
from lmforge import proctree
from lmforge.processes import RedisServer, terminate
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.models import Job, JobStatus, new_id, utcnow
from store.queue import (
    CeleryEnqueuer,
    RedisQueueInspector,
    job_id_of_message,
    make_celery,
    queue_lists,
)
from store.settings import Settings
from store.sweep import sweep_all
from store.workers import (
    RegistryReader,
    WorkerInfo,
    live_workers,
    publish,
    remove,
    waiting_for,
    waiting_label,
)
from tests.e2e.conftest import deep_merge
from tests.e2e.test_faults import CLI, Stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

TINY = {"max_steps": 10, "eval_interval": 10, "log_interval": 5}
METRICS_TOKEN = "queues-metrics-token"


class QueueStack(Stack):
    """:class:`tests.e2e.test_faults.Stack` with workers started with any ``lmforge worker``
    options, and the worker registry read from its Redis."""

    def start_worker_with(self, name: str, *options: str) -> subprocess.Popen[bytes]:
        proc = self._spawn(name, [*CLI, "worker", "--concurrency", "1",
                                  "--hostname", f"{name}@%h", *options])
        self.workers[name] = proc
        return proc

    def registry(self) -> list[WorkerInfo]:
        client = redis.Redis.from_url(self.redis.url)
        try:
            return live_workers(client)
        finally:
            client.close()

    def registered(self, prefix: str, count: int = 1) -> list[WorkerInfo]:
        """Until ``count`` live workers whose node name starts with ``prefix`` are
        registered; returns them."""
        def found() -> list[WorkerInfo]:
            ws = [w for w in self.registry() if w.hostname.startswith(prefix)]
            return ws if len(ws) == count else []
        return list(wait_for(f"{count} workers {prefix}* registered", found))

    def submit_spec(self, **overrides: Any) -> str:
        spec = deep_merge(self.spec(10, **TINY), overrides)
        response = self.client.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[QueueStack]:
    s = QueueStack(tmp_path / "stack", f"sqlite:///{tmp_path / 'lmforge.db'}",
                   LMFORGE_METRICS_TOKEN=METRICS_TOKEN)
    try:
        yield s
    finally:
        s.close()


def _started(job: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(job["attempt_history"][0]["started_at"])


def test_a_cuda_job_waits_on_cpu_workers_with_waiting_for_cuda_until_a_cuda_worker_takes_it(
    stack: QueueStack,
) -> None:
    stack.start_api()
    stack.start_worker_with("cpu1", "--device", "cpu")
    (cpu,) = stack.registered("cpu1@")
    assert (cpu.queues, cpu.device_class, cpu.gpus_per_job) == (("cpu", "lmforge"), "cpu", 1)

    cuda_job = stack.submit_spec(training={"device": "cuda"}, name="needs-cuda")
    cpu_job = stack.submit_spec(name="cpu")  # submitted after it, on the cpu queue
    job = stack.api.wait(cuda_job, "waiting for cuda", lambda j: j["waiting_for"] == "cuda")
    assert job["status"] == "queued"
    assert job["spec"]["resources"] == {"device": "cuda", "gpus": 1, "queue": None}

    # The CPU worker runs the later CPU job to the end and never touches the CUDA one, whose
    # message still waits on the "cuda" queue.
    assert stack.api.wait_finished(cpu_job)["status"] == "succeeded", stack.logs()
    job = stack.api.job(cuda_job)
    assert (job["status"], job["attempts"], job["waiting_for"]) == ("queued", 0, "cuda")
    inspector = RedisQueueInspector(stack.redis.url)
    assert inspector.pending_job_ids(0.0, queues=["cuda"]) == {cuda_job}
    assert inspector.pending_job_ids(0.0, queues=["cpu", "lmforge"]) == set()
    listed = stack.client.get("/v1/jobs").json()["data"]
    assert {j["id"]: j["waiting_for"] for j in listed} == {cuda_job: "cuda", cpu_job: None}
    status = subprocess.run(
        [*CLI, "status", cuda_job, "--url", str(stack.client.base_url), "--api-key",
         stack.client.headers["Authorization"].split()[1]],
        env=stack.env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "waiting   for cuda (no live worker serves its queue" in status.stdout
    assert "schedule  device cuda, 1 process(es), priority 5" in status.stdout
    # /metrics: the message waits on "cuda", which no live worker serves.
    scrape = stack.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    samples = {(smp.name, smp.labels.get("queue")): smp.value
               for fam in text_string_to_metric_families(scrape.text) for smp in fam.samples
               if smp.name in ("lmforge_queue_messages", "lmforge_queue_workers")}
    assert {k: v for k, v in samples.items() if k[1] in ("cuda", "cpu", "lmforge")} == {
        ("lmforge_queue_messages", "cuda"): 1.0, ("lmforge_queue_workers", "cuda"): 0.0,
        ("lmforge_queue_messages", "cpu"): 0.0, ("lmforge_queue_workers", "cpu"): 1.0,
        ("lmforge_queue_messages", "lmforge"): 0.0, ("lmforge_queue_workers", "lmforge"): 1.0}

    # A worker that serves "cuda" takes it (here, without CUDA, the job then fails as it
    # should: device_unavailable).
    stack.start_worker_with("gpu", "--device", "cuda")
    (gpu,) = stack.registered("gpu@")
    assert (gpu.queues, gpu.device_class) == (("cuda", "lmforge"), "cuda")
    done = stack.api.wait_finished(cuda_job)
    # The worker id is "<machine>:<pid>" of the pool process that claimed it: the cuda worker's.
    claimed_by = int(done["attempt_history"][0]["worker"].rsplit(":", 1)[1])
    assert claimed_by in proctree.descendants(stack.workers["gpu"].pid), done
    assert (done["status"], done["error"]["code"]) == ("failed", "device_unavailable"), done
    assert done["waiting_for"] is None
    inspector.close()


def test_a_higher_priority_job_starts_first_on_its_queue(stack: QueueStack) -> None:
    stack.start_api()
    low = stack.submit_spec(name="low", priority=1)
    default = stack.submit_spec(name="default")  # priority 5
    high = stack.submit_spec(name="high", priority=9)
    jobs = {j: stack.api.job(j) for j in (low, default, high)}
    # No worker yet: each waits, and the API tells the order the queue serves them in.
    assert {j: (v["waiting_for"], v["progress"]["queue_position"]) for j, v in jobs.items()} \
        == {high: ("cpu", 1), default: ("cpu", 2), low: ("cpu", 3)}
    # A job on a named queue that nobody serves: its long "waits: queue ..." keeps the
    # `lmforge jobs` table's columns aligned.
    named = stack.submit_spec(name="named", resources={"queue": "nightly-large-models"})
    assert stack.api.job(named)["waiting_for"] == "queue nightly-large-models"
    listed = subprocess.run(
        [*CLI, "jobs", "--url", str(stack.client.base_url), "--api-key",
         stack.client.headers["Authorization"].split()[1]],
        env=stack.env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert len(rows) == 4 and any("waits: queue nightly-large-models" in r for r in rows)
    age_end = header.index("AGE") + len("AGE")  # the AGE column is right-aligned
    assert all(r[age_end - 1] != " " and r[age_end:age_end + 2] == "  " for r in rows), \
        listed.stdout

    stack.start_worker_with("solo")  # concurrency 1: one job at a time
    done = {j: stack.api.wait_finished(j) for j in (low, default, high)}
    assert {d["status"] for d in done.values()} == {"succeeded"}, stack.logs()
    assert _started(done[high]) < _started(done[default]) < _started(done[low])


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.decode().split("=", 1) for kv in raw.split(b"\0") if b"=" in kv)


@pytest.mark.parametrize(("options", "expected"), [
    (["--gpus", "0,1"], {"gpu0": ("0", ("cuda", "lmforge"), 1),
                         "gpu1": ("1", ("cuda", "lmforge"), 1)}),
    (["--gpus", "0,1,2,3", "--gpus-per-job", "2"],
     {"gpu0+1": ("0,1", ("cuda-x2", "lmforge-x2"), 2),
      "gpu2+3": ("2,3", ("cuda-x2", "lmforge-x2"), 2)}),
])
def test_worker_gpus_starts_one_process_per_gpu_group_and_all_stop_on_sigterm(
    stack: QueueStack, options: list[str], expected: dict[str, tuple[str, tuple[str, ...], int]],
) -> None:
    supervisor = stack._spawn("gpus", [*CLI, "worker", *options])
    workers = stack.registered("gpu", count=len(expected))
    seen = {w.hostname.split("@")[0]: (w.gpus, w.queues, w.gpus_per_job) for w in workers}
    assert seen == expected
    children = {w.pid for w in workers}
    assert children <= proctree.descendants(supervisor.pid)
    assert {_environ(w.pid)["CUDA_VISIBLE_DEVICES"] for w in workers} \
        == {gpus for gpus, _, _ in expected.values()}
    assert {w.device_class for w in workers} == {"cuda"}

    tree = proctree.descendants(supervisor.pid) | {supervisor.pid}
    assert terminate(supervisor, signal.SIGTERM, timeout=90) == 0, stack.logs()
    assert proctree.wait_gone(tree) == set()
    assert stack.registry() == []  # a clean shutdown removes each entry


def test_worker_gpus_refuses_a_group_size_that_does_not_divide_the_gpus(
    stack: QueueStack,
) -> None:
    out = subprocess.run([*CLI, "worker", "--gpus", "0,1,2", "--gpus-per-job", "2"],
                         env=stack.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--gpus lists 3 GPUs, not a multiple of --gpus-per-job 2" in out.stderr


# -- the sweep and the inspector on every queue, with a real Redis --------------------------------


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def test_the_queued_sweep_requeues_a_job_on_its_own_queue_and_priority(
    factory: Any, tmp_path: Path,
) -> None:
    broker = RedisServer(dir=tmp_path / "redis").start()
    try:
        settings = Settings(REDIS_URL=broker.url, LMFORGE_REQUEUE_AFTER_S=60)
        spec = {"dataset_id": "ds", "training": {"device": "cuda"},
                "resources": {"device": "cuda", "gpus": 1, "queue": None}, "priority": 7}
        job_id = new_id("job")
        with session_scope(factory) as s:  # queued, never handed to the broker
            s.add(Job(id=job_id, status=JobStatus.QUEUED, spec=spec, progress={"step": 0},
                      enqueued_at=None))
        enqueuer = CeleryEnqueuer(make_celery(settings))
        inspector = RedisQueueInspector(broker.url)
        result = sweep_all(factory, enqueuer, settings, inspector, queued=True)
        assert result.queued == [job_id]
        # Priority 7 is broker priority 2: kombu's list "cuda\x06\x162" of the cuda queue.
        client = redis.Redis.from_url(broker.url)
        lists = queue_lists("cuda")
        assert {name: client.llen(name) for name in lists if client.llen(name)} \
            == {lists[2]: 1}
        assert job_id_of_message(client.lrange(lists[2], 0, -1)[0]) == job_id
        # Its message is found on the cuda queue: once older than requeue_after_s it is not
        # sent again.
        with session_scope(factory) as s:
            s.get_one(Job, job_id).enqueued_at = utcnow().replace(year=2000)
        again = sweep_all(factory, enqueuer, settings, inspector, queued=True)
        assert again.enqueued == []
        assert inspector.queue_lengths(["cuda", "lmforge"]) == {"cuda": 1, "lmforge": 0, "": 0}
        client.close()
        inspector.close()
    finally:
        broker.stop()


def test_waiting_for_names_what_no_live_worker_offers() -> None:
    assert [waiting_label(q) for q in ("cuda", "cpu", "lmforge", "cuda-x2", "lmforge-x4",
                                       "cpu-x2", "a100")] \
        == ["cuda", "cpu", "worker", "cuda x2", "worker x4", "cpu x2", "queue a100"]
    assert waiting_for("cuda", {"cpu", "lmforge"}) == "cuda"
    assert waiting_for("cuda", {"cuda"}) is None
    assert waiting_for("cuda", None) is None  # the registry could not be read


def test_a_registry_reader_with_redis_down_answers_none(tmp_path: Path) -> None:
    broker = RedisServer(dir=tmp_path / "redis").start()
    reader = RegistryReader(broker.url, cache_s=0.0)
    assert reader.workers() == []
    broker.stop()
    assert reader.workers() is None and reader.served_queues() is None
    reader.close()


def test_two_workers_with_one_node_name_keep_an_entry_each(tmp_path: Path) -> None:
    # Celery's default node name is celery@<host>: two workers started on one host without
    # --hostname share it, and neither may overwrite or, at its shutdown, delete the other's.
    broker = RedisServer(dir=tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(broker.url)
        cpu = WorkerInfo(hostname="celery@vm", queues=("cpu", "lmforge"), device_class="cpu",
                         gpus=None, gpus_per_job=1, pid=101, started_at="t")
        x2 = WorkerInfo(hostname="celery@vm", queues=("cpu-x2", "lmforge-x2"),
                        device_class="cpu", gpus=None, gpus_per_job=2, pid=102,
                        started_at="t")
        publish(client, cpu)
        publish(client, x2)
        publish(client, cpu)  # a refresh
        assert sorted(w.pid for w in live_workers(client)) == [101, 102]
        remove(client, x2)  # its clean shutdown
        assert live_workers(client) == [cpu]
        client.close()
    finally:
        broker.stop()


def test_queue_positions_count_within_each_queue_by_priority_then_enqueue_time(
    factory: Any,
) -> None:
    t0 = utcnow()

    def job(device: str, priority: int, enqueued_s: float | None) -> str:
        job_id = new_id("job")
        spec = {"dataset_id": "ds", "training": {"device": device}, "priority": priority,
                "resources": {"device": device, "gpus": 1, "queue": None}}
        with session_scope(factory) as s:
            s.add(Job(id=job_id, status=JobStatus.QUEUED, spec=spec, progress={"step": 0},
                      enqueued_at=None if enqueued_s is None
                      else t0 + timedelta(seconds=enqueued_s)))
        return job_id

    cpu_old_low = job("cpu", 1, 0)
    cpu_new_high = job("cpu", 9, 10)
    cpu_mid_unsent = job("cpu", 5, None)  # not handed to the broker yet
    cpu_mid = job("cpu", 5, 5)
    cuda_low = job("cuda", 0, 1)
    old_spec = new_id("job")  # stored before resources/priority existed: device auto, 5
    with session_scope(factory) as s:
        s.add(Job(id=old_spec, status=JobStatus.QUEUED, spec={"dataset_id": "ds"},
                  progress={"step": 0}, enqueued_at=t0))
    with session_scope(factory) as s:
        got = queue_positions(s, [cpu_old_low, cpu_new_high, cpu_mid_unsent, cpu_mid,
                                  cuda_low, old_spec])
    assert got == {cpu_new_high: 1, cpu_mid: 2, cpu_mid_unsent: 3, cpu_old_low: 4,
                   cuda_low: 1, old_spec: 1}
