"""The one Celery configuration, shared by the producer (API) and the worker, and the API's
enqueuer (by task name: the API never imports the worker's code, nor torch).

Routing (docs/deploy.md, "Queues and devices"): every enqueue sends a job's message to the queue
of :func:`core.routing.job_route` with its broker priority (:class:`CeleryEnqueuer`;
:func:`stored_route` for a job read back from the database). On Redis, kombu keeps one list per
priority step and a worker pops the lower step first: with :data:`PRIORITY_STEPS` = 0..9 each
broker priority has its own list, so within a queue a higher spec ``priority`` (a lower broker
priority) is always served first, equal ones in publication order (kombu
``transport/redis.py``: ``_put``, ``_brpop_start``; Celery's "Routing Tasks" guide, "Redis
Message Priorities").

Why each setting is what it is (late acks, reject on worker loss, prefetch 1, the visibility
timeout, no result backend) is in ``docs/operations.md``: in short, a killed pool child's job
is redelivered, a long job holds no other job hostage, a running job is not redelivered while
it still runs, and the database, not Celery, is the record of a job's state (a duplicate
delivery is harmless anyway: the runner claims the job in the database).

:class:`RedisQueueInspector` tells the queued sweep (:mod:`store.sweep`) which jobs still have a
message in Redis, read straight from kombu's keys.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

from celery import Celery
from pydantic import ValidationError

from core.routing import DEFAULT_QUEUE, Route, job_route
from core.spec import JobSpec
from store.settings import Settings

log = logging.getLogger(__name__)

QUEUE = DEFAULT_QUEUE
#: kombu's Redis priority steps: all ten (the default is 0, 3, 6, 9, which would lump
#: neighbouring priorities together). A message of broker priority n goes to list
#: ``<queue>`` (n = 0) or ``<queue>\x06\x16<n>``; a worker pops step 0 first.
PRIORITY_STEPS = list(range(10))
#: The route of a spec with every scheduling default (device "auto", one process, priority 5).
DEFAULT_ROUTE = Route(queue=DEFAULT_QUEUE, broker_priority=9 - 5, device_class="auto",
                      world_size=1)
TRAIN_TASK = "lmforge.train_job"
#: Seconds a Redis connect or command may block a publisher, the queue inspection or the
#: worker's broker connection (kombu's ``socket_connect_timeout`` and ``socket_timeout``): a
#: Redis that is gone, or frozen with its port still open, is an error within seconds, never
#: a hang.
BROKER_SOCKET_TIMEOUT_S = 2.0
#: How long the worker's main process waits for a killed pool process's result before it
#: reports the task's worker lost (Celery's ``worker_lost_wait``; default 10 s). The task
#: returns nothing the worker needs, so waiting buys nothing.
WORKER_LOST_WAIT_S = 1.0


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    app = Celery("lmforge", broker=settings.redis_url, include=list(include))
    app.conf.update(
        # Every train message names its queue and priority (CeleryEnqueuer.enqueue).
        task_default_queue=QUEUE,
        task_queue_max_priority=max(PRIORITY_STEPS),
        task_default_priority=DEFAULT_ROUTE.broker_priority,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Without it a publish to a Redis that stopped answering (frozen, or gone without
            # closing the connection) waits forever (kombu's redis transport documentation).
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_S,
            # One list per broker priority 0..9, popped lowest first; a worker's queues are
            # tried in the order it lists them (its own device queue before "lmforge") within
            # one priority step, instead of round robin.
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
        },
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # Redis outages (docs/operations.md, "Faults"): the worker reconnects for as long as
        # it takes (default: 100 tries, then the worker exits), and a running task trains on
        # while the broker is away instead of being cancelled.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # A publish to an unreachable broker fails within seconds (then the API leaves the job
        # queued with enqueued_at NULL for the queued sweep) instead of retrying for minutes.
        broker_connection_timeout=BROKER_SOCKET_TIMEOUT_S,
        worker_lost_wait=WORKER_LOST_WAIT_S,
        task_publish_retry_policy={
            "max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        # After SIGTERM is remapped to SIGQUIT (REMAP_SIGTERM=SIGQUIT), the running task gets
        # this long before the message is restored to the queue.
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout_s,
    )
    return app


def stored_route(spec: Mapping[str, Any] | None) -> Route:
    """The route (:func:`core.routing.job_route`) of a job whose spec was stored as ``spec``
    (a JSON object: ``JobSpec`` with defaults filled in). Only the fields that decide the
    route are read (``resources``, ``priority``, ``training.device``), so a spec stored by
    an older version (no ``resources``: routed by ``training.device``, priority 5) routes
    too. A spec whose routing fields no longer validate gets :data:`DEFAULT_ROUTE` (logged).
    Raises nothing."""
    spec = spec or {}
    training = spec.get("training") if isinstance(spec.get("training"), Mapping) else {}
    fields: dict[str, Any] = {"dataset_id": "-"}  # JobSpec needs a source; not routed on
    if isinstance(training, Mapping) and "device" in training:
        fields["training"] = {"device": training["device"]}
    for key in ("resources", "priority"):
        if spec.get(key) is not None:
            fields[key] = spec[key]
    try:
        return job_route(JobSpec.model_validate(fields))
    except ValidationError as exc:
        log.warning("a stored spec's routing fields do not validate (%s); routing it to %s",
                    exc.errors()[0].get("msg"), DEFAULT_ROUTE.queue)
        return DEFAULT_ROUTE


class Enqueuer(Protocol):
    def enqueue(self, job_id: str, route: Route) -> None:
        """Hand job ``job_id`` (already committed) to the workers: a message on
        ``route.queue`` with broker priority ``route.broker_priority``. Raises on failure."""
        ...

    def ping(self) -> bool:
        """Whether the broker answers."""
        ...


class CeleryEnqueuer:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def enqueue(self, job_id: str, route: Route) -> None:
        self.celery.send_task(TRAIN_TASK, args=[job_id], queue=route.queue,
                              priority=route.broker_priority)
        log.info("enqueued %s on %s (broker priority %d)", job_id, route.queue,
                 route.broker_priority)

    def ping(self) -> bool:
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:  # any transport error means "not reachable"
            log.warning("broker not reachable", exc_info=True)
            return False


def job_id_of_message(payload: bytes | str | dict[str, Any]) -> str | None:
    """The job id that a kombu Redis message for :data:`TRAIN_TASK` carries, else None.

    ``payload`` is what kombu's Redis transport stores (or that, parsed): a JSON object whose
    ``headers.task`` names the task and whose ``body`` (base64 when
    ``properties.body_encoding`` says so) is Celery's task message protocol 2,
    ``[args, kwargs, embed]``. Falls back to the
    ``headers.argsrepr`` that Celery adds (``"['job_...']"``) when the body cannot be read.
    Sources: kombu ``transport/virtual/base.py`` (``Message``), Celery's "Message Protocol"
    reference. Raises nothing."""
    try:
        message = payload if isinstance(payload, dict) else json.loads(payload)
        headers = message.get("headers") or {}
    except (ValueError, TypeError, AttributeError):
        return None
    if headers.get("task") != TRAIN_TASK:
        return None
    try:
        body: Any = message.get("body")
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        args = decoded[0] if isinstance(decoded, list) else decoded.get("args")
        return str(args[0])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, binascii.Error):
        pass
    try:
        args = ast.literal_eval(headers.get("argsrepr") or "")
        return str(args[0])
    except (ValueError, TypeError, SyntaxError, IndexError, KeyError):
        return None


def queue_lists(queue: str) -> list[str]:
    """kombu's Redis lists of ``queue``: ``queue`` itself (broker priority 0), then
    ``queue\x06\x16<n>`` for each other step of :data:`PRIORITY_STEPS` (kombu
    ``Channel._q_for_pri`` with the default separator)."""
    from kombu.transport.redis import Channel

    return [queue if not pri else f"{queue}{Channel.sep}{pri}" for pri in PRIORITY_STEPS]


class RedisQueueInspector:
    """Which jobs have a message in the Redis broker: waiting in a queue, or delivered to a
    worker that has not acknowledged it yet.

    Reads kombu's own keys with ``redis-py`` (kombu ``transport/redis.py``): a queue is one
    list per priority step (:func:`queue_lists`), and a delivered, unacknowledged message sits
    in the ``unacked`` hash (its delivery tag -> ``[message, exchange, routing_key]``) with its
    delivery time (Unix seconds) in the ``unacked_index`` sorted set (one hash for every
    queue). Key names come from kombu's ``Channel`` defaults; a ``global_keyprefix`` or
    ``sep`` transport option or a Sentinel URL is not supported (we set none of them).

    ``queue``: the queue read when a call names none (default ``lmforge``); the sweep and the
    metrics pass every queue a queued job routes to.

    Every command is bounded by ``socket_timeout`` seconds: a Redis that is down or frozen
    raises ``redis.exceptions.RedisError`` instead of blocking the worker's main process."""

    def __init__(self, redis_url: str, queue: str = QUEUE, *,
                 socket_timeout: float = BROKER_SOCKET_TIMEOUT_S) -> None:
        import redis
        from kombu.transport.redis import Channel

        self.client = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout,
                                           socket_connect_timeout=socket_timeout)
        self.queue = queue
        self.lists = queue_lists(queue)
        self.unacked_key = Channel.unacked_key
        self.unacked_index_key = Channel.unacked_index_key

    def _queues(self, queues: Iterable[str] | None) -> list[str]:
        return sorted(set(queues)) if queues is not None else [self.queue]

    def queue_lengths(self, queues: Iterable[str] | None = None) -> dict[str, int]:
        """Messages waiting in each of ``queues`` (every priority step), and under the key
        ``""`` the delivered, unacknowledged ones (all queues together). One pipeline.
        Raises ``redis.exceptions.RedisError`` when Redis does not answer."""
        names = self._queues(queues)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            for key in queue_lists(name):
                pipe.llen(key)
        pipe.hlen(self.unacked_key)
        *lengths, unacked = pipe.execute()
        steps = len(PRIORITY_STEPS)
        out = {name: int(sum(lengths[i * steps:(i + 1) * steps]))
               for i, name in enumerate(names)}
        out[""] = int(unacked)
        return out

    def messages(self, queues: Iterable[str] | None = None) -> list[bytes]:
        """The raw messages waiting in ``queues``, in the order a worker takes them: the
        lowest priority step first, each step oldest first (kombu pushes with LPUSH and pops
        with BRPOP); across queues of one step, in the order given."""
        names = list(queues) if queues is not None else [self.queue]
        pipe = self.client.pipeline(transaction=False)
        for pri in range(len(PRIORITY_STEPS)):
            for name in names:
                pipe.lrange(queue_lists(name)[pri], 0, -1)
        return [m for step in pipe.execute() for m in reversed(step)]

    def pending_job_ids(self, delivered_since: float,
                        queues: Collection[str] | None = None) -> set[str]:
        """Ids of the jobs with a message in one of ``queues`` (default: this inspector's
        queue), or delivered (from any queue) at or after
        ``delivered_since`` (Unix seconds) and not acknowledged. An unacknowledged message
        delivered earlier is left out: a live worker claims its job within seconds of the
        delivery, so such a message is held by a worker that died (kombu would restore it
        only after the visibility timeout, days later). Raises
        ``redis.exceptions.RedisError`` when Redis does not answer."""
        pipe = self.client.pipeline(transaction=False)
        for queue in self._queues(queues):
            for name in queue_lists(queue):
                pipe.lrange(name, 0, -1)
        pipe.zrangebyscore(self.unacked_index_key, delivered_since, "+inf")
        *queued, recent = pipe.execute()
        found = {job for payloads in queued for p in payloads
                 if (job := job_id_of_message(p)) is not None}
        if recent:
            for entry in self.client.hmget(self.unacked_key, recent):
                if entry is None:
                    continue  # acknowledged meanwhile
                try:
                    message = json.loads(entry)[0]
                except (ValueError, TypeError, IndexError, KeyError):
                    continue
                if (job := job_id_of_message(message)) is not None:
                    found.add(job)
        return found

    def close(self) -> None:
        self.client.close()
