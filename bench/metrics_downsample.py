"""How long ``GET /v1/jobs/{id}/metrics?resolution=N`` and ``metrics.csv`` take on a job with
``--rows`` metric rows (docs/benchmarks.md, "Long runs").

Makes a database (a SQLite file in a temporary folder; ``--postgres``: a temporary embedded
PostgreSQL server from the ``pgserver`` wheel; ``--database-url``: an empty database), one job
and ``--rows`` language-model metric rows of a noisy decaying loss curve with validation
every 100 steps, then times, in process and without HTTP:

- ``downsample``: ``app.metricseries.downsample`` (min/max per bucket in SQL) for each
  ``--resolution``, of train_loss and of val_loss;
- ``python_minmax``: the same selection done by loading every row into Python (what the
  SQL avoids), for comparison;
- ``csv``: streaming every row through ``app.metricseries.csv_rows``.

Prints one JSON line (median of ``--repeat`` runs, seconds).

    .venv/bin/python bench/metrics_downsample.py --rows 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.metricseries import csv_rows, downsample
from store.db import make_engine, make_session_factory, upgrade_database
from store.models import Job, JobStatus, Metric, new_id


def _median(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def fill(factory: sessionmaker[Session], rows: int) -> str:
    """One job with ``rows`` metric rows; returns its id."""
    rng = random.Random(0)
    job_id = new_id("job")
    with factory() as s:
        s.add(Job(id=job_id, status=JobStatus.SUCCEEDED, spec={"training": {"max_steps": rows}},
                  progress={"step": rows, "total_steps": rows, "tokens_seen": 0}))
        s.commit()
        batch: list[dict[str, Any]] = []
        for step in range(1, rows + 1):
            loss = 1.5 + 3.0 * math.exp(-step / (rows / 10)) + rng.gauss(0, 0.05)
            values: dict[str, Any] = {
                "epoch": step / 5000, "train_loss": loss, "lr": 1e-3, "grad_norm": 0.5,
                "tokens_per_s": 50000.0 + rng.random(), "elapsed_s": step * 0.02,
                "tokens_seen": step * 2048, "val_loss": None, "val_ppl": None,
                "val_bpc": None, "val_accuracy": None, "val_top5_accuracy": None}
            if step % 100 == 0:
                values.update(val_loss=loss + 0.1, val_ppl=math.exp(loss + 0.1))
            batch.append({"job_id": job_id, "step": step, "values": values})
            if len(batch) == 20000:
                s.execute(insert(Metric), batch)
                batch.clear()
        if batch:
            s.execute(insert(Metric), batch)
        s.commit()
    return job_id


def _one_pass(factory: sessionmaker[Session], job_id: str) -> None:
    with factory() as s:
        s.scalar(select(func.count(Metric.values["train_loss"].as_float()))
                 .where(Metric.job_id == job_id))


def python_minmax(factory: sessionmaker[Session], job_id: str, resolution: int) -> int:
    """The same buckets, computed by loading every row (the approach the SQL avoids)."""
    with factory() as s:
        pts = [(step, v["train_loss"]) for step, v in
               s.execute(select(Metric.step, Metric.values).where(Metric.job_id == job_id))]
    buckets = (resolution - 2) // 2
    lo, hi = pts[0][0], pts[-1][0]
    best: dict[int, tuple[tuple[float, int], tuple[float, int]]] = {}
    for step, v in pts:
        b = (step - lo) * buckets // (hi - lo + 1)
        cur = best.get(b)
        best[b] = ((v, step), (v, step)) if cur is None else (min(cur[0], (v, step)),
                                                               max(cur[1], (v, step)))
    return len(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--resolution", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        if args.postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.support.postgres import PostgresServer

            server = PostgresServer.temporary()
            stack.callback(server.remove)
            server.start()
            url = server.create_database("bench")
        upgrade_database(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        t = time.perf_counter()
        job_id = fill(factory, args.rows)
        out: dict[str, Any] = {"backend": engine.dialect.name, "rows": args.rows,
                               "fill_s": round(time.perf_counter() - t, 1)}
        # The floor for any method that reads the values: one pass extracting train_loss.
        out["one_json_pass_s"] = _median(lambda: _one_pass(factory, job_id), args.repeat)
        for n in args.resolution:
            def run(metric: str, n: int = n) -> None:
                with factory() as s:
                    picked = downsample(s, job_id, n, metric)
                    assert len(picked.rows) <= n
            out[f"downsample_train_loss_{n}_s"] = _median(lambda: run("train_loss"), args.repeat)
            out[f"downsample_val_loss_{n}_s"] = _median(lambda: run("val_loss"), args.repeat)
        n = args.resolution[0]
        out[f"python_minmax_{n}_s"] = _median(lambda: python_minmax(factory, job_id, n), 1)
        out["csv_s"] = _median(lambda: sum(len(c) for c in csv_rows(factory, job_id)), 1)
        out["csv_bytes"] = sum(len(c) for c in csv_rows(factory, job_id))
        out["load_average_1m"] = round(os.getloadavg()[0], 1)
        out["cpus"] = os.cpu_count()
        engine.dispose()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
