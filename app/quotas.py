"""Quotas and resource limits of the API (OWASP API4:2023, "Unrestricted Resource
Consumption"); docs/security.md, "Quotas and resource limits", lists them with their statuses.

- A job's size at submission (:func:`check_job_size`): parameters and estimated training
  memory (:mod:`core.estimate`) against ``LMFORGE_MAX_PARAMS`` and the memory limit of its
  device class; the tokens of one evaluation against ``LMFORGE_MAX_EVAL_TOKENS``. 422
  ``job_too_large`` / ``eval_too_large`` with the numbers.
- Per principal (admins exempt; a limit of 0 turns a quota off): running and queued jobs at
  submission (429 ``quota_exceeded``: it frees up as jobs finish), stored dataset bytes (409
  ``quota_exceeded``: delete datasets or ask for more), requests per minute
  (:func:`enforce_rate_limit`, 429 ``rate_limited`` with ``Retry-After``), event streams
  (:func:`stream_slot`, for the events route of issue 13: no stream exists yet).
- Request bodies (:class:`BodySizeLimit`): every body but a dataset upload is refused past
  ``LMFORGE_MAX_JSON_BODY_BYTES`` with 413 before it is parsed; uploads keep their own cap
  (``LMFORGE_MAX_UPLOAD_BYTES``, ``app.routes.uploads``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import Principal, PrincipalDep
from app.http_errors import error_response
from core.errors import Conflict, LMForgeError, ValidationFailed
from core.estimate import (
    VocabBound,
    device_class,
    param_count,
    train_memory_bytes,
    vocab_bound,
)
from core.spec import JobSpec
from core.textstats import TextStats
from store.models import Dataset, Job, JobStatus
from store.settings import Settings

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60
#: After Redis failed, the rate limit is skipped (fail open) for this many seconds before
#: Redis is tried again, so an outage costs one failed connection per window, not per request.
REDIS_RETRY_AFTER_S = 5.0


class QuotaExceeded(LMForgeError):
    """A per-principal quota that frees up by itself (jobs finish): 429."""

    status_code = 429
    code = "quota_exceeded"


class RateLimited(LMForgeError):
    """Too many requests in the current window: 429 with ``Retry-After`` (seconds)."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


# -- the size of a job ------------------------------------------------------------------------


def check_job_size(spec: JobSpec, settings: Settings, train: TextStats,
                   validation_tokens: int | None, bound: VocabBound | None = None,
                   num_labels: int | None = None) -> None:
    """422 ``job_too_large`` when the spec's model has more than ``LMFORGE_MAX_PARAMS``
    parameters or its estimated training memory exceeds the limit of its device class
    (``auto``: the smaller of the CPU and CUDA limits, as it may run on either), both with
    the vocabulary's upper bound (:func:`core.estimate.vocab_bound` of ``train``, the main
    dataset's statistics). 422 ``eval_too_large`` when one evaluation would read more than
    ``LMFORGE_MAX_EVAL_TOKENS`` of a ``validation_tokens``-token split.
    ``bound``: the vocabulary to use instead (:func:`app.jobs.size_basis`: the dataset's
    exact statistics, or ``init_from``'s vocabulary); ``num_labels``: a classify job's
    classes (its head, :func:`core.estimate.param_count`)."""
    if bound is None:
        bound = vocab_bound(spec, train)
    params = param_count(spec, bound.size, num_labels)
    memory = train_memory_bytes(spec, bound.size, num_labels)
    cls = device_class(spec.training.device)
    limits = {"cpu": settings.max_train_memory_bytes_cpu,
              "cuda": settings.max_train_memory_bytes_cuda}
    mem_limit = limits[cls] if cls is not None else min(limits.values())
    numbers = {"parameters": params, "max_parameters": settings.max_params,
               "train_memory_bytes": memory, "max_train_memory_bytes": mem_limit,
               "device_class": cls or "auto", "vocab_size_bound": bound.size}
    if params > settings.max_params:
        raise ValidationFailed(
            f"the model has {params:,} parameters (vocabulary of at most {bound.size:,}: "
            f"{bound.why}), more than this service's limit of {settings.max_params:,} "
            f"(LMFORGE_MAX_PARAMS); use a smaller hidden_dim, embed_dim, num_layers or "
            f"vocabulary", code="job_too_large", field="model.hidden_dim", details=[numbers])
    if memory > mem_limit:
        raise ValidationFailed(
            f"training needs about {_gib(memory)} ({memory:,} bytes: weights, gradients, "
            f"optimizer state and the activations of batch_size x seq_len = "
            f"{spec.training.batch_size} x {spec.training.seq_len} with a vocabulary of at "
            f"most {bound.size:,}), more than the {_gib(mem_limit)} this service allows on "
            f"{cls or 'any device (device auto)'}; use a smaller batch_size, seq_len, model "
            f"or vocabulary", code="job_too_large", field="training.batch_size",
            details=[numbers])
    cap = spec.training.eval_tokens
    per_eval = validation_tokens if cap is None or validation_tokens is None else min(
        cap, validation_tokens)
    if per_eval is not None and per_eval > settings.max_eval_tokens:
        raise ValidationFailed(
            f"each evaluation would read {per_eval:,} validation tokens, more than this "
            f"service's limit of {settings.max_eval_tokens:,} (LMFORGE_MAX_EVAL_TOKENS); set "
            f"training.eval_tokens to at most that", code="eval_too_large",
            field="training.eval_tokens",
            details=[{"eval_tokens": per_eval, "max_eval_tokens": settings.max_eval_tokens}])


# -- per-principal quotas ---------------------------------------------------------------------


def check_job_quota(session: Session, principal: Principal, settings: Settings) -> None:
    """429 ``quota_exceeded`` when ``principal`` already has ``LMFORGE_QUOTA_QUEUED_JOBS``
    queued jobs (admins and 0 limits exempt). ``LMFORGE_QUOTA_RUNNING_JOBS`` is enforced where
    jobs start, by the worker's claim (:func:`store.progress.claim_job`): a principal's jobs
    past it wait queued."""
    if principal.is_admin:
        return
    limit = settings.quota_queued_jobs
    if not limit:
        return
    have = int(session.scalar(select(func.count()).select_from(Job).where(
        Job.owner_id == principal.id, Job.status == JobStatus.QUEUED)) or 0)
    if have >= limit:
        raise QuotaExceeded(
            f"you have {have} queued jobs, the most this service allows per principal "
            f"({limit}); submit again once one has started (or cancel one)",
            details=[{"quota": "queued_jobs", "limit": limit, "current": have}])


def stored_dataset_bytes(session: Session, principal: Principal) -> int:
    """Bytes of the datasets ``principal`` owns."""
    return int(session.scalar(select(func.coalesce(func.sum(Dataset.bytes), 0))
                              .where(Dataset.owner_id == principal.id)) or 0)


def check_dataset_quota(session: Session, principal: Principal, settings: Settings,
                        new_bytes: int) -> None:
    """409 ``quota_exceeded`` when storing ``new_bytes`` more would take ``principal``'s
    datasets past ``LMFORGE_QUOTA_DATASET_BYTES`` (admins and a 0 limit exempt)."""
    limit = settings.quota_dataset_bytes
    if principal.is_admin or not limit:
        return
    have = stored_dataset_bytes(session, principal)
    if have + new_bytes > limit:
        raise Conflict(
            f"your datasets hold {have:,} bytes; {new_bytes:,} more would exceed this "
            f"service's quota of {limit:,} bytes per principal "
            f"(LMFORGE_QUOTA_DATASET_BYTES); delete datasets first",
            code="quota_exceeded",
            details=[{"quota": "dataset_bytes", "limit": limit, "current": have,
                      "requested": new_bytes}])


# -- event streams ----------------------------------------------------------------------------

_streams: dict[str, int] = {}
_streams_lock = threading.Lock()


@contextmanager
def stream_slot(principal: Principal, settings: Settings) -> Iterator[None]:
    """Hold one of ``principal``'s ``LMFORGE_QUOTA_STREAMS`` concurrent event streams (this API
    process's count) for the duration of a stream; raises :class:`QuotaExceeded` (429) when
    all are taken. For the events route (issue 13); no route streams yet."""
    limit = settings.quota_streams
    with _streams_lock:
        have = _streams.get(principal.id, 0)
        if limit and not principal.is_admin and have >= limit:
            raise QuotaExceeded(
                f"you have {have} open event streams, the most this service allows per "
                f"principal ({limit}); close one first",
                details=[{"quota": "streams", "limit": limit, "current": have}])
        _streams[principal.id] = have + 1
    try:
        yield
    finally:
        with _streams_lock:
            _streams[principal.id] -= 1
            if not _streams[principal.id]:
                del _streams[principal.id]


# -- request rate -----------------------------------------------------------------------------


class RateLimiter:
    """A fixed-window counter per principal in Redis (``INCR`` + ``EXPIRE`` of
    ``lmforge:rate:<principal>:<window>``), so every API process sharing ``REDIS_URL`` shares
    the count. When Redis cannot be reached the request is let through (fail open) and a
    warning is logged; Redis is tried again after :data:`REDIS_RETRY_AFTER_S`."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self._down_until = 0.0

    def hit(self, principal_id: str, limit: int, now: float | None = None) -> int | None:
        """Count one request; the seconds to wait when it is over ``limit`` in this window,
        else None."""
        now = time.time() if now is None else now
        if time.monotonic() < self._down_until:
            return None
        window = int(now // RATE_WINDOW_S)
        key = f"lmforge:rate:{principal_id}:{window}"
        try:
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, RATE_WINDOW_S + 5)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + REDIS_RETRY_AFTER_S
            log.warning("rate limit not enforced: Redis is unreachable (%s)",
                        type(exc).__name__)
            return None
        if count <= limit:
            return None
        return max(1, math.ceil((window + 1) * RATE_WINDOW_S - now))


def enforce_rate_limit(request: Request, principal: PrincipalDep) -> None:
    """A dependency of every ``/v1`` route: 429 ``rate_limited`` with ``Retry-After`` past
    ``LMFORGE_RATE_LIMIT_PER_MINUTE`` requests of ``principal`` in the current minute
    (admins and a 0 limit exempt)."""
    settings: Settings = request.app.state.settings
    limit = settings.rate_limit_per_minute
    if not limit or principal.is_admin:
        return
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        limiter = request.app.state.rate_limiter = RateLimiter(settings.redis_url)
    wait = limiter.hit(principal.id, limit)
    if wait is not None:
        raise RateLimited(
            f"more than {limit} requests in a minute (LMFORGE_RATE_LIMIT_PER_MINUTE); retry "
            f"in {wait} s", retry_after_s=wait,
            details=[{"limit": limit, "window_s": RATE_WINDOW_S, "retry_after_s": wait}])


# -- request bodies ---------------------------------------------------------------------------


class BodySizeLimit:
    """Pure ASGI middleware: a request body other than a dataset upload (``POST
    /v1/datasets``, capped by its own route) is read here up to ``max_bytes``; past that (or a
    ``Content-Length`` above it) the answer is 413 ``payload_too_large`` and the application
    never sees the body, so nothing parses it. A body within the limit is handed on
    unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _limit(self, scope: Scope) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        settings = getattr(scope.get("app"), "state", None)
        s = getattr(settings, "settings", None)
        return int(s.max_json_body_bytes) if s is not None else 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or (
            scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/datasets"
        ):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(
            413, "payload_too_large",
            f"the request body exceeds the limit of {limit} bytes "
            f"(LMFORGE_MAX_JSON_BODY_BYTES)", details=[{"limit_bytes": limit}])
        await response(scope, receive, send)


def install_limits(app: FastAPI) -> None:
    """Add :class:`BodySizeLimit` and the 429 handler of :class:`RateLimited` (with its
    ``Retry-After``) to ``app``; the rate limit itself is a dependency of the ``/v1`` router
    (:func:`enforce_rate_limit`)."""
    app.add_middleware(BodySizeLimit)

    @app.exception_handler(RateLimited)
    async def _rate_limited(_: Request, exc: RateLimited) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.field, exc.details,
                              headers={"Retry-After": str(exc.retry_after_s)})
