"""Webhook deliveries: a daemon thread in each API process posts a job to its ``notify.url``
once the job has finished, signed, with retries (docs/operations.md, "Webhooks").

**Where.** In the API process, on a thread of its own (:class:`WebhookDispatcher`, started by
``app.main``'s lifespan when ``LMFORGE_WEBHOOK_SECRET`` is set), never in the worker: a
delivery cannot hold up a training job, and the body is the job exactly as ``GET
/v1/jobs/{id}`` gives it (``app.routes.jobs``), which the worker may not import. Every
terminal status is seen, whoever set it (the runner, a cancel, the sweeps): the thread looks
at the jobs of the ``waiting`` rows (:class:`store.models.WebhookDelivery`, made with the job)
every ``LMFORGE_WEBHOOK_POLL_S`` seconds.

**At least once.** Each try is claimed with a compare-and-set on ``next_attempt_at`` (moved
past the try's timeout), so several API processes share the work and never send one try
twice; a process that dies during a try leaves the row to be tried again after that lease.
Receivers deduplicate by the delivery id (``X-LMForge-Delivery``, the body's ``id``).

**Retries.** A try fails on a connection error, a timeout or any answer but 2xx (redirects
are not followed); the next try waits ``LMFORGE_WEBHOOK_RETRY_FIRST_S`` seconds, doubling each
time up to ``LMFORGE_WEBHOOK_RETRY_MAX_S``; after ``LMFORGE_WEBHOOK_MAX_ATTEMPTS`` tries the
row is ``failed``. A URL refused at delivery time (its name now resolves to a private
address) fails at once.

**The request.** ``POST`` with ``Content-Type: application/json`` and the body ``{"id":
<delivery id>, "event": "job.succeeded" | "job.failed" | "job.cancelled", "timestamp": <Unix
seconds>, "attempt": <n>, "job": <GET /v1/jobs/{id}>}``; headers ``X-LMForge-Event``,
``X-LMForge-Delivery``, ``X-LMForge-Timestamp`` (the body's ``timestamp``) and
``X-LMForge-Signature: sha256=<hex HMAC-SHA256 of the raw body with LMFORGE_WEBHOOK_SECRET>``.
The timestamp is inside the signed body, so a receiver that checks the signature and refuses
a timestamp more than a few minutes old refuses a replayed request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.outbound import OutboundRefused, Target, resolve_public
from store.db import session_scope
from store.logs import job_log_context
from store.models import Job, JobStatus, WebhookDelivery, utcnow
from store.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-LMForge-Signature"
TIMESTAMP_HEADER = "X-LMForge-Timestamp"
EVENT_HEADER = "X-LMForge-Event"
DELIVERY_HEADER = "X-LMForge-Delivery"
USER_AGENT = "LMForge-Webhook/1"
EVENTS = {JobStatus.SUCCEEDED: "job.succeeded", JobStatus.FAILED: "job.failed",
          JobStatus.CANCELLED: "job.cancelled"}
#: Rows handled per poll (the rest wait for the next one).
BATCH = 20


def sign(secret: str, body: bytes) -> str:
    """The ``X-LMForge-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256 of
    the raw body keyed with ``secret`` (UTF-8)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str, timestamp: int | None = None,
           *, now: float | None = None, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: the signature matches ``body`` (constant-time compare) and, when
    ``timestamp`` (the body's) is given, it is within ``tolerance_s`` seconds of ``now``."""
    if not hmac.compare_digest(sign(secret, body), signature):
        return False
    if timestamp is not None:
        return abs((time.time() if now is None else now) - timestamp) <= tolerance_s
    return True


def backoff_s(attempts: int, settings: Settings) -> float:
    """Seconds before try ``attempts + 1`` after ``attempts`` failed tries: ``first * 2 **
    (attempts - 1)``, at most ``LMFORGE_WEBHOOK_RETRY_MAX_S``."""
    return float(min(settings.webhook_retry_first_s * 2 ** max(attempts - 1, 0),
                     settings.webhook_retry_max_s))


@dataclass
class Claimed:
    """One try claimed by this process."""

    id: str
    job_id: str
    url: str
    event: str
    attempt: int


@dataclass
class TryResult:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    final: bool = False  # no retry (the URL was refused)


def _pinned_request(target: Target) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL to send to (the checked address in place of the name), the Host header and
    the TLS server name (the certificate is checked against the name, not the address)."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    netloc = address if parts.port is None else f"{address}:{parts.port}"
    url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host = parts.netloc.rsplit("@", 1)[-1]
    extensions: dict[str, Any] = {"sni_hostname": target.host} if parts.scheme == "https" else {}
    return url, {"Host": host}, extensions


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings,
         resolver: Callable[..., Any] | None = None) -> TryResult:
    """One try: resolve and check ``url``'s host (:func:`core.outbound.resolve_public`, unless
    ``LMFORGE_WEBHOOK_ALLOW_PRIVATE``), connect to the checked address, ``POST`` ``body``.
    Never raises. ``resolver`` replaces ``socket.getaddrinfo`` (tests of DNS rebinding)."""
    try:
        target = resolve_public(url, allow_private=settings.webhook_allow_private,
                                **({"resolver": resolver} if resolver else {}))
    except OutboundRefused as exc:
        return TryResult(False, error=f"refused: {exc}", final=True)
    send_url, host, extensions = _pinned_request(target)
    try:
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                          trust_env=False) as client:
            r = client.post(send_url, content=body, headers={**headers, **host},
                            extensions=extensions)
    except httpx.HTTPError as exc:
        return TryResult(False, error=f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= r.status_code < 300:
        return TryResult(True, status_code=r.status_code)
    return TryResult(False, status_code=r.status_code, error=f"HTTP {r.status_code}")


class WebhookDispatcher:
    """The delivery thread of one API process (see the module docstring).
    ``job_payload(session, job)`` is the job as ``GET /v1/jobs/{id}`` gives it (JSON-able)."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings,
                 job_payload: Callable[[Session, Job], dict[str, Any]]) -> None:
        assert settings.webhook_secret, "webhooks need LMFORGE_WEBHOOK_SECRET"
        self.factory, self.settings, self.job_payload = factory, settings, job_payload
        self.secret: str = settings.webhook_secret
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # the database may be down: try again next time
                log.warning("webhook deliveries: %s: %s", type(exc).__name__, exc)
            self._stop.wait(self.settings.webhook_poll_s)

    # -- one poll ------------------------------------------------------------------------

    def poll(self) -> int:
        """Mark the finished jobs' waiting rows pending, then send the due tries (at most
        :data:`BATCH`). Returns the number of tries sent."""
        self.promote_finished()
        sent = 0
        for claimed in self.claim_due():
            if self._stop.is_set():
                break
            with job_log_context(claimed.job_id):  # its log lines carry the job id
                self.deliver(claimed)
            sent += 1
        return sent

    def promote_finished(self) -> None:
        """``waiting`` rows whose job has a terminal status become ``pending`` (due now),
        with that status's event."""
        now = utcnow()
        with session_scope(self.factory) as s:
            rows = s.execute(
                select(WebhookDelivery.id, Job.status)
                .join(Job, Job.id == WebhookDelivery.job_id)
                .where(WebhookDelivery.state == "waiting",
                       Job.status.in_(list(EVENTS)))
                .limit(BATCH * 5)
            ).all()
            for row_id, status in rows:
                s.execute(update(WebhookDelivery)
                          .where(WebhookDelivery.id == row_id,
                                 WebhookDelivery.state == "waiting")
                          .values(state="pending", event=EVENTS[JobStatus(status)],
                                  next_attempt_at=now)
                          .execution_options(synchronize_session=False))

    def claim_due(self) -> list[Claimed]:
        """The due pending tries this process won: each row's ``next_attempt_at`` moved past
        the try's timeout (its lease) with a compare-and-set, and ``attempts`` counted."""
        now = utcnow()
        lease = timedelta(seconds=self.settings.webhook_timeout_s * 2 + 30)
        won: list[Claimed] = []
        with session_scope(self.factory) as s:
            due = s.execute(
                select(WebhookDelivery.id, WebhookDelivery.job_id, WebhookDelivery.url,
                       WebhookDelivery.event, WebhookDelivery.attempts,
                       WebhookDelivery.next_attempt_at)
                .where(WebhookDelivery.state == "pending",
                       WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(BATCH)
            ).all()
        for row_id, job_id, url, event, attempts, at in due:
            with session_scope(self.factory) as s:
                res = s.execute(update(WebhookDelivery)
                                .where(WebhookDelivery.id == row_id,
                                       WebhookDelivery.state == "pending",
                                       WebhookDelivery.next_attempt_at == at)
                                .values(next_attempt_at=now + lease, attempts=attempts + 1,
                                        last_attempt_at=now)
                                .execution_options(synchronize_session=False))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    won.append(Claimed(row_id, job_id, url, event or "job.finished",
                                       attempts + 1))
        return won

    def body_of(self, claimed: Claimed, timestamp: int) -> bytes | None:
        """The request body of a try, or None when the job is gone (deleted)."""
        with self.factory() as s:
            job = s.get(Job, claimed.job_id)
            if job is None:
                return None
            payload = self.job_payload(s, job)
        return json.dumps({"id": claimed.id, "event": claimed.event, "timestamp": timestamp,
                           "attempt": claimed.attempt, "job": payload},
                          separators=(",", ":")).encode()

    def deliver(self, claimed: Claimed) -> TryResult:
        """Send one claimed try and record its outcome."""
        timestamp = int(time.time())
        body = self.body_of(claimed, timestamp)
        if body is None:
            result = TryResult(False, error="the job no longer exists", final=True)
        else:
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                EVENT_HEADER: claimed.event,
                DELIVERY_HEADER: claimed.id,
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.secret, body),
            }
            result = post(claimed.url, body, headers, self.settings)
        self.record(claimed, result)
        return result

    def record(self, claimed: Claimed, result: TryResult) -> None:
        now = utcnow()
        values: dict[str, Any] = {"last_status_code": result.status_code,
                                  "last_error": None if result.ok else (result.error or "")[:500]}
        if result.ok:
            values.update(state="delivered", delivered_at=now, next_attempt_at=None)
            log.info("webhook %s of job %s delivered (%s, try %d)", claimed.id,
                     claimed.job_id, result.status_code, claimed.attempt)
        elif result.final or claimed.attempt >= self.settings.webhook_max_attempts:
            values.update(state="failed", next_attempt_at=None)
            log.warning("webhook %s of job %s failed after %d tries: %s", claimed.id,
                        claimed.job_id, claimed.attempt, result.error)
        else:
            wait = backoff_s(claimed.attempt, self.settings)
            values.update(next_attempt_at=now + timedelta(seconds=wait))
            log.info("webhook %s of job %s: try %d failed (%s); next in %.1f s", claimed.id,
                     claimed.job_id, claimed.attempt, result.error, wait)
        with session_scope(self.factory) as s:
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == claimed.id)
                      .values(**values).execution_options(synchronize_session=False))


def job_payload(session: Session, job: Job) -> dict[str, Any]:
    """The job exactly as ``GET /v1/jobs/{id}`` answers it (``app.routes.jobs``), as JSON
    values."""
    from app.routes.jobs import _out  # the route module imports this one's callers

    return _out(session, job).model_dump(mode="json")


def deliveries_of(session: Session, job_id: str) -> list[WebhookDelivery]:
    """The job's delivery rows, oldest first."""
    return list(session.scalars(select(WebhookDelivery)
                                .where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
