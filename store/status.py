"""The job status machine: the one function that changes a job's status.

:func:`transition` is a compare-and-set (``UPDATE jobs ... WHERE id = :id AND status IN
(allowed sources)``) checked against :data:`ALLOWED_TRANSITIONS`, so two processes racing on one
job cannot both win, and an illegal move is a :class:`Conflict` (409), never a silent
overwrite. Used by the API (``app.jobs``) and the runner's side (``store.progress``).

Helpers take the caller's session and never commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound
from store.models import Job, JobStatus, utcnow

S = JobStatus
TERMINAL_STATES: frozenset[JobStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # failed: nothing takes this move since issue 8 (the API used it to fail a job the broker
    # refused, enqueue_failed; such a job now stays queued for the queued sweep). Still
    # allowed, as tests/api/test_transitions.py pins it.
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    # queued: the orphan sweep hands a job whose worker died back to the queue, and a worker
    # that is shutting down hands back the job it was running (store.progress.requeue_interrupted).
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    **{s: frozenset() for s in TERMINAL_STATES},
}


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    expect: Iterable[JobStatus] | None = None,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> None:
    """Move job ``job_id`` to status ``to`` and set ``values`` in the same UPDATE.

    Allowed only from the states of :data:`ALLOWED_TRANSITIONS` that lead to ``to`` (narrowed
    to ``expect`` when given, and to rows matching ``where``). Sets ``started_at`` on entering
    running and ``finished_at`` on entering a terminal state. Raises :class:`NotFound` for an
    unknown job and :class:`Conflict` when the job is in another state."""
    sources = {s for s, targets in ALLOWED_TRANSITIONS.items() if to in targets}
    if expect is not None:
        sources &= set(expect)
    now = utcnow()
    if to == S.RUNNING:
        values.setdefault("started_at", now)
    if to in TERMINAL_STATES:
        values.setdefault("finished_at", now)
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sources), *where)
        .values(status=to, **values)
        .execution_options(synchronize_session="fetch")
    )
    if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
        return
    current = session.scalar(select(Job.status).where(Job.id == job_id))
    if current is None:
        raise NotFound(f"job {job_id!r} not found")
    raise Conflict(
        f"job {job_id} is {current.value}; it cannot become {to.value}",
        code="invalid_transition",
        details=[{"status": current.value, "requested": to.value}],
    )

