"""A job-running environment for the runner's tests: a real database (a SQLite file or a
PostgreSQL database), real local storage under the test's directory, one dataset of real text,
and :func:`worker.runner.run_job` called directly (no Celery)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.auth import Principal
from app.datasets import add_dataset, new_dataset_id, storage_key
from app.jobs import create_job
from core.corpora import find_corpus
from core.spec import JobSpec
from core.textstats import text_stats
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.models import Checkpoint, Job, JobAttempt, JobStatus, Metric
from store.settings import Settings
from store.storage import LocalStorage
from worker.runner import run_job

# The owner of the environment's dataset and jobs.
OWNER = Principal(id="runner", name="runner", is_admin=False)
SHAKESPEARE = find_corpus("tinyshakespeare/input.txt")


def corpus_text() -> str:
    """20,000 characters of real English text (tinyshakespeare when present)."""
    if SHAKESPEARE is not None:
        return SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    from core.corpora import builtin_corpus

    return builtin_corpus("python-docs")[:20_000]


@dataclass
class Env:
    factory: sessionmaker[Session]
    storage: LocalStorage
    settings: Settings
    dataset_id: str
    run_kwargs: dict[str, Any] = field(default_factory=dict)

    def submit(self, tokenizer: str = "char", **training: Any) -> str:
        """A tiny char model (12 steps, one thread by default); ``training`` overrides the
        section."""
        spec = JobSpec.model_validate({
            "dataset_id": self.dataset_id,
            "tokenizer": {"kind": tokenizer, "vocab_size": 300},
            "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
            # One thread: the tests share a small machine with other work.
            "training": {"batch_size": 4, "seq_len": 16, "max_steps": 12, "eval_interval": 6,
                         "log_interval": 4, "num_threads": 1, **training},
        })
        with session_scope(self.factory) as s:
            return create_job(s, OWNER, spec).id

    def run(self, job_id: str, **kwargs: Any) -> JobStatus | None:
        return run_job(job_id, session_factory=self.factory, settings=self.settings,
                       **{"worker_id": "test", "storage": self.storage, **self.run_kwargs,
                          **kwargs})

    def job(self, job_id: str) -> Job:
        with session_scope(self.factory) as s:
            return s.get_one(Job, job_id, populate_existing=True)

    def train_losses(self, job_id: str) -> list[float]:
        with session_scope(self.factory) as s:
            rows = s.scalars(select(Metric).where(Metric.job_id == job_id)
                             .order_by(Metric.step))
            return [float(r.values["train_loss"]) for r in rows]

    def steps(self, job_id: str) -> list[int]:
        with session_scope(self.factory) as s:
            return list(s.scalars(select(Metric.step).where(Metric.job_id == job_id)
                                  .order_by(Metric.step)))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        with session_scope(self.factory) as s:
            return list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                  .order_by(Checkpoint.kind, Checkpoint.step)))

    def attempts(self, job_id: str) -> list[JobAttempt]:
        with session_scope(self.factory) as s:
            return list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                  .order_by(JobAttempt.attempt)))


def make_env(home: Path, database_url: str | None = None, **settings: Any) -> Env:
    """An :class:`Env` under ``home`` (storage, token cache, and the SQLite file unless
    ``database_url`` names another database), its schema upgraded and one dataset stored.
    ``settings``: more :class:`Settings` fields by alias (e.g.
    ``LMFORGE_HEARTBEAT_TIMEOUT_S=3``)."""
    s = Settings(LMFORGE_HOME=home,
                 DATABASE_URL=database_url or f"sqlite:///{home / 'r.db'}", **settings)
    upgrade_database(s.sqlalchemy_url)
    factory = make_session_factory(make_engine(s.sqlalchemy_url))
    storage = LocalStorage(s.storage_dir)
    text = corpus_text()
    ds = new_dataset_id()
    size, sha = storage.put_bytes(storage_key(ds), text.encode())
    with session_scope(factory) as session:
        add_dataset(session, OWNER, ds, "corpus", size, sha, text_stats(text))
    return Env(factory, storage, s, ds)
