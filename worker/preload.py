"""Warm a worker's pool process before its first job (``LMFORGE_WORKER_PRELOAD``, on by
default).

A fresh pool process pays torch's one-time costs on its first job: importing torch and the
engine (about 1.2 s on two 2.4 GHz EPYC cores) and, inside the first optimizer's constructor,
torch's lazy import of ``torch._dynamo`` (about 1.3 s more), so that job's first training step
came about 3.7 s after its claim instead of 0.03 s (docs/benchmarks.md, "Scale-out:
scheduling overhead and first-step latency"). :func:`preload_engine` pays them when the pool
process starts, by running one tiny training job in memory (no database, no storage, no
token cache; every path a job's first step takes: tokenizer, model, Adam, one step, one
evaluation, a checkpoint serialised and dropped).

:func:`preload_clients` builds the process's database engine and storage client (no
connection), which the first job would otherwise build.

Called by ``worker.celery_app``'s ``worker_process_init`` handler, in each pool process, after
the fork (the worker's main process never imports torch). It blocks the pool process's "up"
message, so ``worker_proc_alive_timeout`` is raised there to :data:`PRELOAD_TIMEOUT_S`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

#: How long a pool process may take to start, preload included (seconds; Celery's
#: ``worker_proc_alive_timeout``, default 4 s, past which the main process kills it).
PRELOAD_TIMEOUT_S = 120.0

#: The warm-up job: tiny, on the CPU, one step per part of the loop.
WARMUP_SPEC: dict[str, Any] = {
    "dataset": {"builtin": "python-docs"},  # not read: the text is given below
    "tokenizer": {"kind": "char"},
    "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1, "dropout": 0.0},
    "training": {"max_steps": 2, "eval_interval": 2, "log_interval": 1, "batch_size": 2,
                 "seq_len": 8, "seed": 0, "device": "cpu"},
    "val_fraction": 0.25,
}
WARMUP_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 8


def preload_clients() -> None:
    """Build this pool process's database engine and blob storage
    (:func:`worker.tasks.session_factory`, :func:`worker.tasks.storage`: cached per process,
    so its jobs use these) without connecting to either: that imports the database driver
    (psycopg: about 0.1 s) and, with S3 storage, boto3 and its client (about 0.3 s), which the
    first job would pay otherwise. A failure (a malformed ``LMFORGE_STORAGE_URL``, say) is
    logged as a warning; the first job then fails with its own error."""
    try:
        from worker.tasks import session_factory, storage

        session_factory()
        storage()
    except Exception as exc:
        log.warning("preloading the database engine and storage failed (%s: %s); the first "
                    "job builds them instead", type(exc).__name__, exc)


def preload_engine() -> float | None:
    """Import torch and the engine and run :data:`WARMUP_SPEC` on :data:`WARMUP_TEXT` on the
    CPU, with the engine's own log records below WARNING silenced meanwhile. Leaves torch's
    thread count as it found it. Returns the seconds it took, or None when it failed (logged
    as a warning: the process's first job then pays the costs, or fails with its own error;
    a preload never stops the pool process)."""
    t0 = time.perf_counter()
    engine_log = logging.getLogger("worker.engine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)
    try:
        import torch

        from core.contract import NullHooks
        from core.sources import CorpusSources, TextSource
        from core.spec import JobSpec
        from worker.engine.trainer import train_sources

        threads = torch.get_num_threads()
        spec = JobSpec.model_validate(WARMUP_SPEC)
        train_sources(spec, CorpusSources(TextSource.from_text(WARMUP_TEXT, "warm-up")),
                      NullHooks(), device="cpu")
        torch.set_num_threads(threads)
    except Exception as exc:
        log.warning("engine preload failed (%s: %s); the first job loads it instead",
                    type(exc).__name__, exc)
        return None
    finally:
        engine_log.setLevel(level)
    took = time.perf_counter() - t0
    log.info("engine preloaded in %.2f s", took)
    return took
