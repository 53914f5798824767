"""Sample responses stored with a job (``job_samples``, migration 0006).

A PPO job (:mod:`worker.ppo_job`) stores some of its rollouts at each evaluation interval:
one row per (job, step), ``values`` a list of ``{"prompt", "response", "reward", ...}``
objects. :func:`record_samples` is the runner's write (fenced by the attempt, like every write
of a running job) and :func:`list_samples` the API's read. Helpers take the caller's session
and never commit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from store.models import JobSample, utcnow
from store.progress import heartbeat

# Bounds on what one row holds, so that a spec asking for many long samples cannot grow a
# row without limit: the first MAX_SAMPLES_PER_STEP samples are kept, and each text field
# keeps its first MAX_TEXT_CHARS characters (``truncated: true`` says so).
MAX_SAMPLES_PER_STEP = 64
MAX_TEXT_CHARS = 2000


def _clean(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy: texts cut to :data:`MAX_TEXT_CHARS`, non-finite numbers as null."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            out[key], out["truncated"] = value[:MAX_TEXT_CHARS], True
        elif isinstance(value, float) and not math.isfinite(value):
            out[key] = None
        else:
            out[key] = value
    return out


def record_samples(session: Session, job_id: str, attempt: int, step: int,
                   samples: Sequence[Mapping[str, Any]]) -> bool:
    """Store ``samples`` as job ``job_id``'s samples at ``step``, replacing any row already
    stored for that step (a resumed run that replays an evaluation replaces, never
    duplicates). Refreshes the heartbeat; returns ``cancel_requested``. Raises
    :class:`store.progress.JobLost` when the job is no longer this attempt's."""
    cancel = heartbeat(session, job_id, attempt)
    values = [_clean(s) for s in samples[:MAX_SAMPLES_PER_STEP]]
    # Delete-then-insert in one transaction: the same on every backend, and the primary key
    # (job_id, step) guarantees one row per step whatever the interleaving.
    session.execute(delete(JobSample).where(JobSample.job_id == job_id, JobSample.step == step))
    session.execute(insert(JobSample), [{"job_id": job_id, "step": step, "values": values,
                                         "created_at": utcnow()}])
    return cancel


def list_samples(session: Session, job_id: str, after_step: int,
                 limit: int) -> tuple[list[JobSample], bool]:
    """Job ``job_id``'s sample rows with ``step > after_step``, by step, at most ``limit``;
    and whether more follow. The caller checks that the job may be seen."""
    rows = list(session.scalars(
        select(JobSample).where(JobSample.job_id == job_id, JobSample.step > after_step)
        .order_by(JobSample.step).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
