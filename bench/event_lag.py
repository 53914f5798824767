"""Metric lag of the event stream (issue 13): from the worker's metrics flush to the client.

    nice -n 5 .venv/bin/python bench/event_lag.py [--steps 3000] [--log-interval 10] \\
        [--out bench/results/event_lag.json]

Starts the embedded stack, ``lmforge up`` (its own ``redis-server``, the API, one worker and
the inference server, with ``LMFORGE_HOME`` in a temporary directory this script creates and
removes by its own handle), submits one small CPU job (the built-in ``python-docs`` corpus,
char tokenizer, 32/64 LSTM, batch 16 x 32, one thread, ``--steps`` steps, a flush every
``--log-interval`` steps), opens ``GET /v1/jobs/{id}/events`` before the job starts and reads
it to the end with httpx, noting the wall time (``time.time()``) at which each ``metrics``
event has been parsed.

The start of the lag is the ``t`` field of each ``metrics`` entry of the job's Redis stream
(:mod:`store.events`): the worker's wall time when its flush wrote the rows, before the
database commit. So a row's lag = the client's time - ``t``: the commit, the hand-over to the
publisher thread, ``XADD``, the API's ``XREAD``, the SSE encoding, HTTP and the client's
parsing. Both clocks are this machine's. Reported: p50/p90/p99/max over every metric row
(the rows of one flush arrive together), over the first row of each flush, the load average
and the CPU count; the job must succeed and each step arrive once, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
KEY_RE = re.compile(r"Admin API key \(shown only this once.*: (lmf_[A-Za-z0-9]+)")
REDIS_RE = re.compile(r"embedded Redis at (redis://\S+)")
DEADLINE_S = 300.0  # a safety net for the stack's start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _summary(lags_s: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in lags_s]
    return {"n": len(ms), "p50_ms": round(_pct(ms, 0.50), 1), "p90_ms": round(_pct(ms, 0.90), 1),
            "p99_ms": round(_pct(ms, 0.99), 1), "max_ms": round(max(ms), 1),
            "mean_ms": round(statistics.fmean(ms), 1)}


class Stack:
    """``lmforge up`` in a temporary LMFORGE_HOME; its output collected by a thread."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="lmforge-event-lag-"))
        self.port = _free_port()
        env = {**os.environ, "LMFORGE_HOME": str(self.tmp / "home"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", "up", "--port", str(self.port)], env=env,
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def wait_ready(self) -> tuple[str, str]:
        """The admin key and the embedded Redis URL, once ``lmforge up`` printed the key."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            text = "".join(self.output)
            key, url = KEY_RE.search(text), REDIS_RE.search(text)
            if key and url:
                return key.group(1), url.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmforge up exited:\n{text}")
            time.sleep(0.1)
        raise RuntimeError("lmforge up did not print an admin key:\n" + "".join(self.output))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_stream(client: httpx.Client, job_id: str
                ) -> tuple[dict[int, float], list[int], dict[str, Any]]:
    """The job's event stream read to its end: when each step's row was parsed (Unix
    seconds), the steps in arrival order, the final status."""
    received: dict[int, float] = {}
    order: list[int] = []
    final: dict[str, Any] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        resp.raise_for_status()
        fields: dict[str, str] = {}
        for line in resp.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if not fields:
                continue
            now = time.time()
            data = json.loads(fields["data"])
            if fields["event"] == "metrics":
                received[data["step"]] = now
                order.append(data["step"])
            elif fields["event"] == "status":
                final = data
            fields = {}
    return received, order, final


def run(steps: int, log_interval: int) -> dict[str, Any]:
    stack = Stack()
    try:
        key, redis_url = stack.wait_ready()
        base = f"http://127.0.0.1:{stack.port}"
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                              timeout=60.0)
        spec = {"name": "event-lag", "dataset": {"builtin": "python-docs"},
                "tokenizer": {"kind": "char"},
                "model": {"embed_dim": 32, "hidden_dim": 64, "num_layers": 1, "dropout": 0.0},
                "training": {"batch_size": 16, "seq_len": 32, "seed": 0, "device": "cpu",
                             "num_threads": 1, "max_steps": steps, "eval_interval": steps,
                             "log_interval": log_interval}}
        load_before = os.getloadavg()
        r = client.post("/v1/jobs", json=spec)
        r.raise_for_status()
        job_id = r.json()["id"]
        received, order, final = read_stream(client, job_id)
        load_after = os.getloadavg()
        # The worker's flush times, from the job's Redis stream.
        r_ = redis.Redis.from_url(redis_url, decode_responses=True)
        flushed: dict[int, float] = {}
        first_of_flush: set[int] = set()
        for _id, entry in r_.xrange(f"lmforge:events:{job_id}"):
            if entry.get("event") == "metrics":
                rows = json.loads(entry["data"])
                for row in rows:
                    flushed.setdefault(row["step"], float(entry["t"]))
                if rows:
                    first_of_flush.add(rows[0]["step"])
        r_.close()
        lags = [received[s] - flushed[s] for s in order if s in flushed]
        first = [received[s] - flushed[s] for s in order if s in first_of_flush]
        checks = {
            "succeeded": final.get("status") == "succeeded",
            "each_step_once_in_order": order == list(range(1, steps + 1)),
            "every_row_timed": len(lags) == steps,
        }
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                        "loadavg_after": load_after},
            "job": {"steps": steps, "log_interval": log_interval, "status": final.get("status")},
            "lag_every_row": _summary(lags),
            "lag_first_row_of_flush": _summary(first),
            "checks": checks,
        }
    finally:
        stack.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/event_lag.json")
    args = ap.parse_args()
    result = run(args.steps, args.log_interval)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
