#!/usr/bin/env python3
"""Data-parallel training on the CPU against one process, side by side in one run
(docs/deploy.md, "Data-parallel jobs"): one process with batch ``2B`` (1 thread, then 2
threads) against ``resources.gpus: 2`` (two gloo processes with batch ``B`` and 1 thread
each), the same global batch, model and steps; training tokens/s of each (the engine's
``train_tokens_per_s``: evaluation and checkpoints excluded), the median of ``--repeats``.

    .venv/bin/python bench/ddp_cpu.py --repeats 3 --json bench/results/ddp_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.contract import NullHooks  # noqa: E402
from core.corpora import builtin_corpus  # noqa: E402
from core.sources import CorpusSources  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from worker.ddp_rank import train_data_parallel  # noqa: E402
from worker.engine.trainer import train_sources  # noqa: E402


def spec(batch_size: int, gpus: int, threads: int, args: argparse.Namespace) -> JobSpec:
    return JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"},
        "model": {"embed_dim": args.embed_dim, "hidden_dim": args.hidden_dim,
                  "num_layers": 2, "dropout": 0.0},
        "training": {"batch_size": batch_size, "seq_len": args.seq_len,
                     "max_steps": args.steps, "eval_interval": 10**6, "log_interval": 10,
                     "device": "cpu", "num_threads": threads},
        "resources": {"device": "cpu", "gpus": gpus},
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16, help="B: per process")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    sources = CorpusSources.from_texts(builtin_corpus("python-docs"))
    b = args.batch_size
    runs: dict[str, list[float]] = {"1 process x batch 2B, 1 thread": [],
                                    "1 process x batch 2B, 2 threads": [],
                                    "2 gloo processes x batch B, 1 thread each": []}
    for _ in range(args.repeats):
        for name, (s, parallel) in {
            "1 process x batch 2B, 1 thread": (spec(2 * b, 1, 1, args), False),
            "1 process x batch 2B, 2 threads": (spec(2 * b, 1, 2, args), False),
            "2 gloo processes x batch B, 1 thread each": (spec(b, 2, 1, args), True),
        }.items():
            run = train_data_parallel if parallel else train_sources
            runs[name].append(run(s, sources, NullHooks()).train_tokens_per_s)
    out: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "loadavg": os.getloadavg()},
        "args": vars(args) | {"json": str(args.json)},
        "tokens_per_s": {k: {"median": statistics.median(v), "runs": v}
                         for k, v in runs.items()},
    }
    base = out["tokens_per_s"]["1 process x batch 2B, 1 thread"]["median"]
    for name, r in out["tokens_per_s"].items():
        print(f"{name:<45} {r['median']:>10,.0f} tokens/s  ({r['median'] / base:.2f}x)")
    print(f"load average {out['machine']['loadavg']}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
