"""``GET /metrics``: the service's metrics in the Prometheus text format (``prometheus-client``).

Two kinds (docs/operations.md, "Metrics"):

- **The service's state**, read at scrape time from the database and Redis, so any API process
  answers the same: jobs by status (``lmforge_jobs``), the broker's queue
  (``lmforge_queue_messages`` by queue: the default ones, every queue a queued job routes to
  and every queue a live worker serves; ``lmforge_queue_unacked_messages``,
  ``lmforge_broker_up``), the live workers by queue (``lmforge_queue_workers``, from the worker
  registry, ``store.workers``),
  each running job's throughput by the worker that runs it
  (``lmforge_worker_steps_per_second``, ``lmforge_worker_tokens_per_second``,
  ``lmforge_worker_heartbeat_age_seconds``), webhook deliveries by state, and whether the
  database answered (``lmforge_database_up``). A handful of indexed queries: a ``GROUP BY``
  over the jobs' ``(status, ...)`` index, two small queries per running job, the queued jobs'
  routing fields, ``LLEN``/``HLEN`` in one Redis pipeline and the registry's cached read (each
  bounded by a 0.5 s socket timeout).
- **This process's requests**: ``lmforge_http_request_duration_seconds``, a histogram by
  method, route template (``/v1/jobs/{job_id}``, never the raw path, so ids do not make new
  series; ``unmatched`` for 404s outside every route) and status code, measured by
  :class:`MetricsMiddleware` from the request's arrival to the last byte of its answer.

**Several API processes.** By default each process keeps its own request histograms and a
scrape sees those of the process that answered. With ``PROMETHEUS_MULTIPROC_DIR`` set (the
same empty directory for every API process of a host, before they start), prometheus-client
keeps the histograms in memory-mapped files there and any process reports the sum over all
(:class:`prometheus_client.multiprocess.MultiProcessCollector`).

Throughput comes from the running jobs' own metric rows (the worker's measurements, one row
per optimizer step), not from a clock in the API: ``tokens_per_second`` is the latest row's
``tokens_per_s``; ``steps_per_second`` is ``(step_b - step_a) / (elapsed_b - elapsed_a)``
between the latest row and the row :data:`STEP_WINDOW` steps before it (or the job's first
row), ``elapsed_s`` being the run's wall-clock seconds.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.workers import get_worker_registry
from store.models import Job, JobStatus, WebhookDelivery, utcnow
from store.models import Metric as MetricRow
from store.queue import QUEUE, RedisQueueInspector
from store.settings import Settings
from store.sweep import queued_queues
from store.workers import served_queues

log = logging.getLogger(__name__)

#: Steps between the two metric rows whose difference gives ``steps_per_second``.
STEP_WINDOW = 100
#: The most running jobs reported one by one (the rest are left out of the per-worker series).
MAX_RUNNING_REPORTED = 200
REDIS_TIMEOUT_S = 0.5

# Latency buckets (seconds): from a cached read to a large upload.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_DURATION = Histogram(
    "lmforge_http_request_duration_seconds",
    "API request latency in seconds, from arrival to the last byte of the answer, by method, "
    "route template and status code.",
    ["method", "route", "status"],
    buckets=BUCKETS,
)


def route_template(scope: Scope) -> str:
    """The matched route's path template with its router prefixes (``/v1/jobs/{job_id}``;
    while the route handles the request FastAPI keeps it in ``scope["fastapi"]
    ["effective_route_context"]``; else the route's own ``path_format``), or
    ``unmatched``."""
    fastapi_scope = scope.get("fastapi")
    context = fastapi_scope.get("effective_route_context") \
        if isinstance(fastapi_scope, dict) else None
    for holder in (context, scope.get("route")):
        template = getattr(holder, "path_format", None)
        if isinstance(template, str) and template:
            return template
    return "unmatched"


class MetricsMiddleware:
    """Time each HTTP request into :data:`HTTP_DURATION` (see the module docstring). Pure
    ASGI: a streamed answer is timed to its last chunk; a request whose app raised counts as
    500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        end: list[float] = []
        route: list[str] = []

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                route.append(route_template(scope))  # inside the route: its full template
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                end.append(time.perf_counter())

        try:
            await self.app(scope, receive, timed_send)
        finally:
            elapsed = (end[0] if end else time.perf_counter()) - start  # to the last byte
            template = route[0] if route else route_template(scope)
            HTTP_DURATION.labels(scope.get("method", "GET"), template,
                                 str(status["code"])).observe(elapsed)


# -- the service's state, at scrape time ------------------------------------------------------


@dataclass
class Running:
    job_id: str
    worker: str
    step: int | None
    tokens_per_s: float | None
    steps_per_s: float | None
    heartbeat_age_s: float | None


@dataclass
class State:
    database_up: bool = False
    jobs: dict[str, int] = field(default_factory=dict)
    running: list[Running] = field(default_factory=list)
    webhooks: dict[str, int] = field(default_factory=dict)
    broker_up: bool | None = None  # None: the broker is not Redis
    # The queues reported: the default ones, the queued jobs' and the live workers'.
    queues: set[str] = field(default_factory=lambda: {QUEUE, "cpu", "cuda"})
    queue_messages: dict[str, int] | None = None  # by queue
    unacked_messages: int | None = None
    workers: dict[str, int] | None = None  # live workers by queue; None: registry unread


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def steps_per_second(latest: dict[str, Any], earlier: dict[str, Any] | None) -> float | None:
    """``(step_b - step_a) / (elapsed_b - elapsed_a)`` of two metric rows (``step`` and
    ``elapsed_s``, seconds); None when it cannot be told (one row, or a resume reset the
    run's clock between them)."""
    if earlier is None:
        return None
    s_b, s_a = _number(latest.get("step")), _number(earlier.get("step"))
    e_b, e_a = _number(latest.get("elapsed_s")), _number(earlier.get("elapsed_s"))
    if None in (s_b, s_a, e_b, e_a):
        return None
    assert s_b is not None and s_a is not None and e_b is not None and e_a is not None
    if s_b <= s_a or e_b <= e_a:
        return None
    return (s_b - s_a) / (e_b - e_a)


def _age_s(at: datetime | None, now: datetime) -> float | None:
    return None if at is None else max((now - at).total_seconds(), 0.0)


def read_database(session: Session, state: State) -> None:
    """Jobs by status, the running jobs' throughput, webhook rows by state."""
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    state.jobs = {s.value: int(counts.get(s, 0)) for s in JobStatus}
    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.worker_id, Job.latest_metrics, Job.heartbeat_at)
        .where(Job.status == JobStatus.RUNNING).order_by(Job.id).limit(MAX_RUNNING_REPORTED)
    ).all()
    for job_id, worker, latest, heartbeat_at in rows:
        latest = latest or {}
        step = latest.get("step")
        earlier = None
        if isinstance(step, int) and step > 1:
            found = session.execute(
                select(MetricRow.step, MetricRow.values)
                .where(MetricRow.job_id == job_id, MetricRow.step <= step - STEP_WINDOW)
                .order_by(MetricRow.step.desc()).limit(1)
            ).first() or session.execute(
                select(MetricRow.step, MetricRow.values)
                .where(MetricRow.job_id == job_id).order_by(MetricRow.step).limit(1)
            ).first()
            if found is not None:
                earlier = {**found[1], "step": found[0]}
        state.running.append(Running(
            job_id=job_id, worker=worker or "unknown",
            step=step if isinstance(step, int) else None,
            tokens_per_s=_number(latest.get("tokens_per_s")),
            steps_per_s=steps_per_second(latest, earlier),
            heartbeat_age_s=_age_s(heartbeat_at, now),
        ))
    hooks = session.execute(select(WebhookDelivery.state, func.count())
                            .group_by(WebhookDelivery.state)).all()
    state.webhooks = {str(k): int(v) for k, v in hooks}
    state.queues |= queued_queues(session)
    state.database_up = True


def read_queue(inspector: RedisQueueInspector | None, state: State) -> None:
    """Each of ``state.queues``'s length (every priority list of the Celery queue) and the
    messages delivered but not acknowledged (running or prefetched tasks)."""
    if inspector is None:
        return
    try:
        lengths = inspector.queue_lengths(state.queues)
    except Exception as exc:  # redis.RedisError, OSError: the broker is down
        log.debug("metrics: the broker did not answer (%s)", exc)
        state.broker_up = False
        return
    state.broker_up = True
    state.unacked_messages = lengths.pop("")
    state.queue_messages = lengths


def state_metrics(state: State) -> list[Metric]:
    """The Prometheus metric families of ``state``."""
    out: list[Metric] = []
    db = GaugeMetricFamily("lmforge_database_up", "1 if the database answered this scrape.")
    db.add_metric([], 1.0 if state.database_up else 0.0)
    out.append(db)
    if state.database_up:
        jobs = GaugeMetricFamily("lmforge_jobs", "Jobs by status.", labels=["status"])
        for status, n in state.jobs.items():
            jobs.add_metric([status], n)
        out.append(jobs)
        tps = GaugeMetricFamily(
            "lmforge_worker_tokens_per_second",
            "Training tokens per second of the job a worker runs (its latest metric row).",
            labels=["worker", "job_id"])
        sps = GaugeMetricFamily(
            "lmforge_worker_steps_per_second",
            f"Optimizer steps per second of the job a worker runs (over its last "
            f"{STEP_WINDOW} metric rows).", labels=["worker", "job_id"])
        step = GaugeMetricFamily("lmforge_worker_job_step",
                                 "The latest reported step of the job a worker runs.",
                                 labels=["worker", "job_id"])
        age = GaugeMetricFamily("lmforge_worker_heartbeat_age_seconds",
                                "Seconds since the running job's last heartbeat (its lease).",
                                labels=["worker", "job_id"])
        for r in state.running:
            for family, value in ((tps, r.tokens_per_s), (sps, r.steps_per_s),
                                  (step, r.step), (age, r.heartbeat_age_s)):
                if value is not None:
                    family.add_metric([r.worker, r.job_id], float(value))
        out.extend([tps, sps, step, age])
        hooks = GaugeMetricFamily("lmforge_webhook_deliveries",
                                  "Webhook deliveries by state.", labels=["state"])
        for s in ("waiting", "pending", "delivered", "failed"):
            hooks.add_metric([s], state.webhooks.get(s, 0))
        out.append(hooks)
    out.extend(_queue_metrics(state))
    return out


def _queue_metrics(state: State) -> list[Metric]:
    """The broker's and the worker registry's families of ``state``."""
    out: list[Metric] = []
    if state.broker_up is not None:
        up = GaugeMetricFamily("lmforge_broker_up", "1 if Redis answered this scrape.")
        up.add_metric([], 1.0 if state.broker_up else 0.0)
        out.append(up)
    if state.queue_messages is not None:
        q = GaugeMetricFamily("lmforge_queue_messages",
                              "Messages waiting in the broker's queue (jobs not yet taken).",
                              labels=["queue"])
        for name, n in sorted(state.queue_messages.items()):
            q.add_metric([name], n)
        out.append(q)
    if state.workers is not None:
        w = GaugeMetricFamily("lmforge_queue_workers",
                              "Live workers (the worker registry) that serve the queue.",
                              labels=["queue"])
        for name in sorted(state.queues):
            w.add_metric([name], state.workers.get(name, 0))
        out.append(w)
    if state.unacked_messages is not None:
        u = GaugeMetricFamily("lmforge_queue_unacked_messages",
                              "Messages delivered to workers and not yet acknowledged.")
        u.add_metric([], state.unacked_messages)
        out.append(u)
    return out


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def _inspector(request: Request) -> RedisQueueInspector | None:
    """One queue inspector per app (a Redis connection pool), None when the broker is not
    Redis."""
    state = request.app.state
    if not hasattr(state, "metrics_inspector"):
        url = state.settings.redis_url
        state.metrics_inspector = (
            RedisQueueInspector(url, socket_timeout=REDIS_TIMEOUT_S)
            if url.split("://", 1)[0] in ("redis", "rediss", "unix") else None)
    inspector: RedisQueueInspector | None = state.metrics_inspector
    return inspector


def collect_state(request: Request) -> State:
    state = State()
    try:
        with request.app.state.session_factory() as session:
            read_database(session, state)
    except Exception as exc:  # the database is down: report it, not a 500
        log.warning("metrics: the database did not answer (%s: %s)", type(exc).__name__, exc)
        state.database_up = False
    registry = get_worker_registry(request)
    workers = registry.workers() if registry is not None else None
    if workers is not None:
        state.queues |= served_queues(workers)
        state.workers = {q: sum(q in w.queues for w in workers) for q in state.queues}
    read_queue(_inspector(request), state)
    return state


def exposition(state: State) -> bytes:
    """The Prometheus text of ``state`` and of the request histograms (this process's, or
    with ``PROMETHEUS_MULTIPROC_DIR`` every process's)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(HTTP_DURATION)
    registry.register(_Fixed(state_metrics(state)))
    return generate_latest(registry)


def authorize(request: Request, settings: Settings) -> None:
    """``/metrics`` takes ``Authorization: Bearer <LMFORGE_METRICS_TOKEN>`` or an admin API key
    (docs/security.md); with ``LMFORGE_AUTH=disabled`` no key. Raises 401/403."""
    if settings.auth == "disabled":
        return
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise HTTPException(401, "send Authorization: Bearer <LMFORGE_METRICS_TOKEN or an admin "
                                 "API key>", headers={"WWW-Authenticate": "Bearer"})
    token = settings.metrics_token
    if token and hmac.compare_digest(credentials.encode(), token.encode()):
        return
    from store import apikeys

    with request.app.state.session_factory() as session:
        row = apikeys.verify_key(session, credentials)
        if row is None:
            raise HTTPException(401, "the token is neither LMFORGE_METRICS_TOKEN nor a valid "
                                     "API key", headers={"WWW-Authenticate":
                                                         'Bearer error="invalid_token"'})
        if not row.is_admin:
            raise HTTPException(403, "/metrics needs an admin API key or "
                                     "LMFORGE_METRICS_TOKEN")


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """The Prometheus exposition (text format 0.0.4)."""
    settings: Settings = request.app.state.settings
    await run_in_threadpool(authorize, request, settings)
    state = await run_in_threadpool(collect_state, request)
    body = await run_in_threadpool(exposition, state)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
