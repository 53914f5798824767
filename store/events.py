"""Job events published to Redis Streams, for the API's live event stream (docs/events.md).

Whoever commits a change of a job that a watcher wants to see (the runner's metric rows and
checkpoint rows, :mod:`store.progress`'s status transitions, the API's cancel) publishes it
*after* the commit: :func:`publish_on_commit` queues the event on the SQLAlchemy session and a
session ``after_commit`` listener hands it to the process's :class:`EventPublisher`; a rollback
drops it. So Redis never shows a change the database does not hold, and one process's events
reach Redis in commit order.

Each job has one stream, ``lmforge:events:<job_id>`` (:func:`stream_key`); an entry has the
fields ``event`` (``metrics``, ``checkpoint``, ``status`` or ``resync``), ``t`` (the Unix time,
in seconds, at which the publishing process wrote the change, before its commit: the start of
the lag that bench/event_lag.py measures) and ``data`` (JSON):

- ``metrics``: the rows of one flush, ``[{"step": int, "values": {name: value}}, ...]``;
- ``checkpoint``: the checkpoint row (``id, job_id, kind, step, bytes, sha256, metrics,
  created_at``);
- ``status``: :func:`status_data` of the job;
- ``resync``: no data; events of this job were lost on the way (Redis was unreachable, or the
  publisher's queue overflowed): a reader should read the database again.

``XADD ... MAXLEN ~ LMFORGE_EVENTS_MAXLEN`` caps a stream; every entry sets the stream to
expire a week later, a terminal status ``LMFORGE_EVENTS_TTL_S`` later.

Publishing never fails or slows a job: :meth:`EventPublisher.publish` appends to a bounded
in-memory queue and returns; a daemon thread sends the queue to Redis. When Redis cannot be
reached the events are dropped (the database stays the record; readers fall back to polling
it), one warning is logged per outage, and the next event of each affected job is preceded by a
``resync`` entry.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import redis
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from store.models import Checkpoint, Job, JobStatus
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The Redis key of a job's event stream is this prefix + the job's id.
STREAM_PREFIX = "lmforge:events:"
#: Any stream expires this long after its last entry (seconds), terminal status or not.
IDLE_TTL_S = 7 * 24 * 3600
#: After a failed send, Redis is tried again after this many seconds (events meanwhile are
#: dropped and their jobs marked for a ``resync``).
RETRY_AFTER_S = 2.0
#: Events held in memory while the sender thread is behind; past this the oldest are dropped.
QUEUE_LIMIT = 10_000
#: Redis client name of the publisher's connection (``CLIENT LIST``).
PUBLISHER_CLIENT_NAME = "lmforge-events-pub"

_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def stream_key(job_id: str) -> str:
    return f"{STREAM_PREFIX}{job_id}"


def status_data(job: Job) -> dict[str, Any]:
    """A ``status`` event's data: ``{"status", "attempt", "cancel_requested", "error"}``
    (``error`` only when the job failed, else None)."""
    return {
        "status": job.status.value,
        "attempt": int(job.attempts or 0),
        "cancel_requested": bool(job.cancel_requested),
        "error": job.error if job.status == JobStatus.FAILED else None,
    }


def checkpoint_data(row: Checkpoint) -> dict[str, Any]:
    """A ``checkpoint`` entry's data: the row's public fields (``created_at`` in ISO 8601)."""
    return {
        "id": row.id, "job_id": row.job_id, "kind": row.kind.value, "step": row.step,
        "bytes": row.bytes, "sha256": row.sha256, "metrics": dict(row.metrics or {}),
        "created_at": row.created_at.isoformat() if row.created_at is not None else None,
    }


class EventPublisher:
    """Sends events to Redis from a daemon thread (started at the first event, in the process
    that publishes: a forked pool child gets its own, :func:`publisher`). ``redis_url``,
    ``maxlen`` (entries kept per stream, approximately) and ``ttl_s`` (expiry after a terminal
    status, seconds) come from the settings."""

    def __init__(self, redis_url: str, maxlen: int, ttl_s: int,
                 queue_limit: int = QUEUE_LIMIT) -> None:
        self.redis_url, self.maxlen, self.ttl_s = redis_url, maxlen, ttl_s
        self._client = redis.Redis.from_url(
            redis_url, socket_connect_timeout=0.5, socket_timeout=2.0,
            client_name=PUBLISHER_CLIENT_NAME)
        self._queue: deque[tuple[str, str, str, bool, float]] = deque()
        self._limit = queue_limit
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._dirty: set[str] = set()  # jobs that lost events: a resync goes first
        self._down_until = 0.0
        self._down = False
        self.sent = 0  # entries written (not counting resyncs)
        self.dropped = 0  # events lost to an unreachable Redis or a full queue

    # -- the caller's side --------------------------------------------------------------------

    def publish(self, job_id: str, event: str, data: Any, *, terminal: bool = False,
                t: float | None = None) -> None:
        """Queue one event of ``job_id`` (never blocks, never raises). ``terminal``: the job
        ended; its stream expires ``ttl_s`` seconds after this entry. ``t``: when the change
        was written (Unix seconds; default now)."""
        try:
            payload = json.dumps(data, separators=(",", ":"), default=str)
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold: say so, go on
            log.warning("job %s: %s event not published (%s)", job_id, event, exc)
            return
        with self._cond:
            if len(self._queue) >= self._limit:
                lost = self._queue.popleft()
                self._dirty.add(lost[0])
                self.dropped += 1
            self._queue.append((job_id, event, payload, terminal,
                                time.time() if t is None else t))
            self._cond.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lmforge-events",
                                                daemon=True)
                self._thread.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued event was sent (or dropped); False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # -- the sender thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                self._send(batch)
            except Exception:  # never let the thread die: log and go on
                log.exception("job events: sending failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, batch: list[tuple[str, str, str, bool, float]]) -> None:
        if time.monotonic() < self._down_until:
            self._lose(batch)
            return
        pipe = self._client.pipeline(transaction=False)
        resynced: set[str] = set()
        for job_id, event, payload, terminal, t in batch:
            key = stream_key(job_id)
            if job_id in self._dirty and job_id not in resynced:
                pipe.xadd(key, {"event": "resync", "t": repr(t), "data": "null"},
                          maxlen=self.maxlen, approximate=True)
                resynced.add(job_id)
            pipe.xadd(key, {"event": event, "t": repr(t), "data": payload},
                      maxlen=self.maxlen, approximate=True)
            pipe.expire(key, self.ttl_s if terminal else IDLE_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._lose(batch)
            self._down_until = time.monotonic() + RETRY_AFTER_S
            if not self._down:
                self._down = True
                log.warning("job events are not published: Redis at %s is unreachable (%s); "
                            "the database stays the record and event streams read it "
                            "instead", _safe_url(self.redis_url), type(exc).__name__)
            return
        self._dirty -= resynced
        self.sent += len(batch)
        if self._down:
            self._down = False
            log.info("job events are published again")

    def _lose(self, batch: list[tuple[str, str, str, bool, float]]) -> None:
        self.dropped += len(batch)
        self._dirty.update(job_id for job_id, *_ in batch)


def _safe_url(url: str) -> str:
    """``url`` without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


# -- one publisher per process and configuration ---------------------------------------------

_publishers: dict[tuple[int, str, int, int], EventPublisher] = {}
_publishers_lock = threading.Lock()
_configured: Settings | None = None


def configure(settings: Settings | None) -> None:
    """Make ``settings`` (``REDIS_URL``, ``LMFORGE_EVENTS_*``) the ones the events committed
    through :func:`publish_on_commit` use (the worker calls it with its settings; without it,
    or after ``configure(None)``, :func:`store.settings.get_settings`)."""
    global _configured
    _configured = settings


def publisher(settings: Settings | None = None) -> EventPublisher:
    """This process's publisher for ``settings`` (default: the configured ones)."""
    s = settings or _configured or get_settings()
    key = (os.getpid(), s.redis_url, s.events_maxlen, s.events_ttl_s)
    with _publishers_lock:
        pub = _publishers.get(key)
        if pub is None:
            pub = _publishers[key] = EventPublisher(s.redis_url, s.events_maxlen,
                                                    s.events_ttl_s)
        return pub


# -- publishing after the commit --------------------------------------------------------------

_PENDING = "lmforge.events.pending"


def publish_on_commit(session: Session, job_id: str, event: str, data: Any, *,
                      terminal: bool = False) -> None:
    """Publish the event once ``session`` commits (dropped if it rolls back)."""
    session.info.setdefault(_PENDING, []).append((job_id, event, data, terminal, time.time()))


def publish_status_on_commit(session: Session, job: Job) -> None:
    """A ``status`` event of ``job`` (as it is in ``session``) once ``session`` commits."""
    publish_on_commit(session, job.id, "status", status_data(job),
                      terminal=job.status in _TERMINAL)


@sa_event.listens_for(Session, "after_commit")
def _publish_pending(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    try:
        pub = publisher()
        for job_id, event, data, terminal, t in pending:
            pub.publish(job_id, event, data, terminal=terminal, t=t)
    except Exception:  # publishing must never fail a commit
        log.exception("job events were not published")


@sa_event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)
