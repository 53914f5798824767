"""A job's event stream (``GET /v1/jobs/{id}/events``, docs/events.md): Server-Sent Events
built from the database (the history, and the record) and Redis Streams (live delivery,
:mod:`store.events`).

One :class:`JobEventStream` per connection:

1. It notes the newest entry of the job's Redis stream (``XREVRANGE ... COUNT 1``), then reads
   the database: the job's status, the metric rows after the client's position (pages of
   :data:`PAGE_ROWS`), the checkpoint rows. Everything committed before that read is in the
   history; everything committed after it was published after the noted entry.
2. It then reads the Redis stream from the noted entry (``XREAD BLOCK``, on its own
   connection, closed with the stream) and sends what is new. A ``status`` or ``resync``
   entry, and every ``LMFORGE_EVENTS_RECONCILE_S`` seconds, it reads the database again for
   what no process published (the sweeps' requeues and failures, events lost while Redis was
   unreachable). Without Redis it reads the database every ``LMFORGE_EVENTS_POLL_S`` seconds
   and tries Redis again every :data:`REDIS_RETRY_S` seconds.
3. At the terminal status it reads the database a last time: the remaining rows, one
   ``warning`` per entry of the result's ``warnings``, the terminal ``status``, and the end.

Within a stream a step is sent once (``pos.step`` only grows), a checkpoint once (by id).
A client that disconnects cancels the stream at once (:class:`EventStreamResponse` listens for
``http.disconnect``): its Redis connection is closed and its quota slot released.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.params import MAX_INT32
from app.schemas import CheckpointOut, MetricOut
from core.errors import ValidationFailed
from store.events import status_data, stream_key
from store.models import Checkpoint, Job, Metric
from store.settings import Settings
from store.status import TERMINAL_STATES

log = logging.getLogger(__name__)

#: Metric rows read from the database at a time.
PAGE_ROWS = 1000
#: Entries read from Redis at a time.
XREAD_COUNT = 1000
#: After Redis failed, a stream reads the database and tries Redis again this often (seconds).
REDIS_RETRY_S = 5.0
#: Steps whose sent values a stream remembers, to tell a replayed step that differs.
REMEMBERED_STEPS = 4096
#: Redis client name of a stream's connection (``CLIENT LIST``).
STREAM_CLIENT_NAME = "lmforge-events-stream"
#: The response's headers besides the content type.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEARTBEAT = b": heartbeat\n\n"

#: The ids this stream sends (``<step>`` or ``<step>:<checkpoint id>``), or nothing.
LAST_EVENT_ID_PATTERN = r"^(\d{1,10}(:[a-z]+_[0-9a-f]{32})?)?$"
_ID_RE = re.compile(r"^(\d{1,10})(?::([a-z]+_[0-9a-f]{32}))?$")


# -- what the client has seen -----------------------------------------------------------------


@dataclass
class Position:
    """The metric rows up to ``step`` and the checkpoints of the steps before it (and, with
    ``checkpoint``, those of ``step`` up to that one)."""

    step: int = 0
    checkpoint: str | None = None


def parse_position(last_event_id: str | None, after_step: int | None) -> Position:
    """The position a request resumes from: ``Last-Event-ID`` (``<step>`` or
    ``<step>:<checkpoint id>``, as this stream sends them) wins over ``?after_step=``. Raises
    :class:`ValidationFailed` (422) naming ``Last-Event-ID`` when it is malformed. A step past
    the largest a job can have (2^31 - 1) means "after every step"."""
    if last_event_id is not None and last_event_id.strip():
        m = _ID_RE.fullmatch(last_event_id.strip())
        if m is None:
            raise ValidationFailed(
                f"Last-Event-ID must be an event id this stream sent (a step, or "
                f"<step>:<checkpoint id>), not {last_event_id[:60]!r}", field="Last-Event-ID")
        return Position(min(int(m.group(1)), MAX_INT32), m.group(2))
    return Position(after_step or 0)


def _sse(event: str, data: str, event_id: str | None = None) -> bytes:
    """One event: ``data`` is one line of JSON."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {data}\n\n".encode()


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)


def metric_json(step: int, values: dict[str, Any]) -> str:
    """A metric row as ``GET /v1/jobs/{id}/metrics`` gives one (the route's serializer:
    pydantic's JSON, non-finite numbers as null)."""
    return MetricOut.model_validate({**values, "step": step}).model_dump_json()


def checkpoint_json(row: Checkpoint | dict[str, Any]) -> str:
    """A checkpoint row as ``GET /v1/jobs/{id}/checkpoints`` gives one."""
    return CheckpointOut.model_validate(row).model_dump_json()


def _is_timing(name: str) -> bool:
    """A metric that measures time, which a replayed step reports anew (``elapsed_s``,
    ``tokens_per_s``, other ``*_per_s``)."""
    return name == "elapsed_s" or name.endswith("_per_s")


def _fingerprint(values: dict[str, Any]) -> int:
    return hash(json.dumps({k: v for k, v in values.items() if not _is_timing(k)},
                           sort_keys=True, default=str))


# -- the database side (run on a worker thread) -----------------------------------------------


@dataclass
class JobState:
    status: dict[str, Any]
    terminal: bool
    warnings: list[dict[str, Any]]


def read_job(factory: sessionmaker[Session], job_id: str) -> JobState:
    with factory() as s:
        job = s.get(Job, job_id)
        if job is None:  # jobs are never deleted; be safe
            return JobState({"status": "failed", "attempt": 0, "cancel_requested": False,
                             "error": None}, True, [])
        warnings = (job.result or {}).get("warnings") or []
        return JobState(status_data(job), job.status in TERMINAL_STATES,
                        [w for w in warnings if isinstance(w, dict)])


@dataclass
class CkptRow:
    id: str
    step: int
    created_at: float
    json: str


def read_rows(factory: sessionmaker[Session], job_id: str, after_step: int
              ) -> tuple[list[tuple[int, dict[str, Any]]], list[CkptRow]]:
    """Up to :data:`PAGE_ROWS` metric rows after ``after_step`` (step order), then (read
    after them) every checkpoint row of the job (step, creation order)."""
    with factory() as s:
        metrics = [(m.step, dict(m.values)) for m in s.scalars(
            select(Metric).where(Metric.job_id == job_id, Metric.step > after_step)
            .order_by(Metric.step).limit(PAGE_ROWS))]
        ckpts = [CkptRow(c.id, c.step, c.created_at.timestamp(), checkpoint_json(c))
                 for c in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                    .order_by(Checkpoint.step, Checkpoint.created_at))]
    return metrics, ckpts


# -- open streams -----------------------------------------------------------------------------

_open = 0
_open_redis = 0
_count_lock = threading.Lock()


def open_streams() -> dict[str, int]:
    """This API process's open event streams and the Redis connections they hold."""
    with _count_lock:
        return {"open_streams": _open, "redis_connections": _open_redis}


def _count(streams: int = 0, connections: int = 0) -> None:
    global _open, _open_redis
    with _count_lock:
        _open += streams
        _open_redis += connections


# -- the stream -------------------------------------------------------------------------------


class JobEventStream:
    """The events of job ``job_id`` after ``position``, as SSE-encoded chunks
    (:meth:`chunks`)."""

    def __init__(self, job_id: str, factory: sessionmaker[Session], settings: Settings,
                 position: Position) -> None:
        self.job_id, self.factory, self.settings = job_id, factory, settings
        self.pos = Position(position.step, position.checkpoint)
        self.start = Position(position.step, position.checkpoint)
        self.sent_ckpts: set[str] | None = None  # set at the first read of the checkpoints
        self.sent_values: OrderedDict[int, int] = OrderedDict()
        self.status_key: tuple[Any, ...] | None = None
        self.last_write = time.monotonic()
        self.redis: aioredis.Redis | None = None
        self.redis_id = "0-0"  # the last Redis entry read

    # -- Redis ---------------------------------------------------------------------------

    async def _open_redis(self) -> None:
        """Connect and note the newest entry of the job's stream; on failure stay without."""
        client = aioredis.Redis.from_url(
            self.settings.redis_url, decode_responses=True, single_connection_client=True,
            socket_connect_timeout=0.5, client_name=STREAM_CLIENT_NAME,
            socket_timeout=None)  # XREAD BLOCK waits up to seconds; anyio bounds each read
        _count(connections=1)
        newest: Any = None
        try:
            with anyio.fail_after(2.0):
                newest = await client.xrevrange(stream_key(self.job_id), count=1)
            self.redis = client
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.info("job %s events: Redis unreachable (%s); reading the database every "
                     "%g s", self.job_id, type(exc).__name__, self.settings.events_poll_s)
        finally:  # also when the client disconnected meanwhile (cancelled)
            if self.redis is not client:
                await self._close(client)
        if self.redis is None:
            return
        self.redis_id = str(newest[0][0]) if newest else "0-0"

    async def _close(self, client: aioredis.Redis | None) -> None:
        if client is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await client.aclose()
            except Exception as exc:  # closing a broken connection
                log.debug("closing a stream's Redis connection: %s", exc)
            finally:
                _count(connections=-1)

    async def _read_redis(self, wait_s: float) -> list[tuple[str, dict[str, str]]]:
        """Entries after :attr:`redis_id`, waiting up to ``wait_s`` for the first."""
        assert self.redis is not None
        block_ms = max(1, int(wait_s * 1000))
        with anyio.fail_after(wait_s + 5.0):
            reply: Any = await self.redis.xread({stream_key(self.job_id): self.redis_id},
                                           count=XREAD_COUNT, block=block_ms)
        entries: list[tuple[str, dict[str, str]]] = []
        for _key, items in reply or []:
            entries.extend(items)
        return entries

    # -- writing events -----------------------------------------------------------------------

    def _write(self, chunk: bytes) -> bytes:
        self.last_write = time.monotonic()
        return chunk

    def _status_event(self, status: dict[str, Any]) -> bytes | None:
        key = (status["status"], status["attempt"], status["cancel_requested"])
        if key == self.status_key:
            return None
        self.status_key = key
        return self._write(_sse("status", _json(status)))

    def _metric_event(self, step: int, values: dict[str, Any]) -> bytes | None:
        """The row of ``step`` if it is after the position; a ``replayed_step_differs``
        warning for a replayed step whose values differ from those sent; else None."""
        fp = _fingerprint(values)
        if step <= self.pos.step:
            sent = self.sent_values.get(step)
            if sent is None or sent == fp:
                return None
            self.sent_values[step] = fp
            return self._write(_sse("warning", _json({
                "code": "replayed_step_differs", "step": step,
                "message": f"step {step} was reported again by a resumed run with other "
                           f"values than this stream sent; GET /v1/jobs/{{id}}/metrics has "
                           f"the stored row"})))
        self.pos = Position(step)
        self.sent_values[step] = fp
        if len(self.sent_values) > REMEMBERED_STEPS:
            self.sent_values.popitem(last=False)
        return self._write(_sse("metrics", metric_json(step, values), str(step)))

    def _checkpoint_event(self, ckpt_id: str, step: int, data: str) -> bytes | None:
        assert self.sent_ckpts is not None
        if ckpt_id in self.sent_ckpts:
            return None
        self.sent_ckpts.add(ckpt_id)
        event_id = None
        if step >= self.pos.step:  # else a checkpoint written again behind the client
            self.pos = Position(step, ckpt_id)
            event_id = f"{step}:{ckpt_id}"
        return self._write(_sse("checkpoint", data, event_id))

    def _seen_before_start(self, ckpts: list[CkptRow]) -> set[str]:
        """The checkpoints the client's position says it has."""
        start = self.start
        seen = {c.id for c in ckpts if c.step < start.step}
        if start.checkpoint is not None:
            at = [c for c in ckpts if c.step == start.step]
            mark = next((c for c in at if c.id == start.checkpoint), None)
            # Its checkpoint is gone (replaced): count those of its step as seen.
            seen |= {c.id for c in at if mark is None or c.created_at <= mark.created_at}
        return seen

    # -- reading the database -----------------------------------------------------------------

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(partial(fn, self.factory, self.job_id, *args))

    async def _page(self, final: bool) -> tuple[list[bytes], bool]:
        """One page of the rows committed since the position, from the database, and whether
        more follow. A checkpoint goes out after the metric row of its step; one past the last
        row read waits for the next read (its rows are being committed), unless ``final``."""
        metrics, ckpts = await self._db(read_rows, self.pos.step)
        if self.sent_ckpts is None:
            self.sent_ckpts = self._seen_before_start(ckpts)
        pending = [c for c in ckpts if c.id not in self.sent_ckpts]
        more = len(metrics) == PAGE_ROWS
        out: list[bytes | None] = []
        for step, values in metrics:
            while pending and pending[0].step < step:
                c = pending.pop(0)
                out.append(self._checkpoint_event(c.id, c.step, c.json))
            out.append(self._metric_event(step, values))
        out += [self._checkpoint_event(c.id, c.step, c.json) for c in pending
                if c.step <= self.pos.step or (final and not more)]
        return [c for c in out if c], more

    async def _rows(self, final: bool) -> AsyncIterator[bytes]:
        more = True
        while more:
            out, more = await self._page(final)
            for chunk in out:
                yield chunk

    async def _refresh(self) -> AsyncIterator[bytes]:
        """Read the database again: the new rows and a changed status; at a terminal status
        the end of the stream (then :attr:`done`)."""
        state: JobState = await self._db(read_job)
        async for chunk in self._rows(final=state.terminal):
            yield chunk
        ends = self._ending(state) if state.terminal else [self._status_event(state.status)]
        for end in ends:
            if end:
                yield end

    def _ending(self, state: JobState) -> list[bytes | None]:
        """The warnings of the result and the terminal status (after the last rows)."""
        out: list[bytes | None] = [self._write(_sse("warning", _json(w)))
                                   for w in state.warnings]
        self.status_key = None
        out.append(self._status_event(state.status))
        self.done = True
        return out

    async def _apply(self, kind: str, data: Any) -> AsyncIterator[bytes]:
        """One Redis entry."""
        if kind == "metrics":
            for row in data:
                if chunk := self._metric_event(int(row["step"]), row["values"]):
                    yield chunk
        elif kind == "checkpoint":
            if chunk := self._checkpoint_event(str(data["id"]), int(data["step"]),
                                               checkpoint_json(data)):
                yield chunk
        else:  # status, resync: the database says what changed (and catches lost events)
            async for chunk in self._refresh():
                yield chunk

    # -- the loop -----------------------------------------------------------------------------

    done = False
    read_db_now = False
    redis_retry_at = 0.0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The whole stream: the status, the history, the live events, the end."""
        try:
            await self._open_redis()
            self.redis_retry_at = time.monotonic() + REDIS_RETRY_S
            state: JobState = await self._db(read_job)
            if not state.terminal and (chunk := self._status_event(state.status)):
                yield chunk
            async for chunk in self._rows(final=state.terminal):
                yield chunk
            if state.terminal:
                for end in self._ending(state):
                    if end:
                        yield end
                return
            async for chunk in self._live():
                yield chunk
        finally:
            client, self.redis = self.redis, None
            await self._close(client)

    def _db_interval(self) -> float:
        s = self.settings
        return s.events_reconcile_s if self.redis is not None else s.events_poll_s

    async def _live(self) -> AsyncIterator[bytes]:
        heartbeat_s = self.settings.events_heartbeat_s
        next_db = time.monotonic() + self._db_interval()
        while not self.done:
            wait = max(0.001, min(next_db, self.last_write + heartbeat_s) - time.monotonic())
            for entry_id, fields in await self._entries(wait):
                self.redis_id = entry_id
                async for chunk in self._apply(fields.get("event", ""),
                                               json.loads(fields.get("data") or "null")):
                    yield chunk
                if self.done:
                    return
            if self.read_db_now or time.monotonic() >= next_db:
                self.read_db_now = False
                next_db = time.monotonic() + self._db_interval()
                async for chunk in self._refresh():
                    yield chunk
            if not self.done and time.monotonic() - self.last_write >= heartbeat_s:
                yield self._write(HEARTBEAT)

    async def _entries(self, wait_s: float) -> list[tuple[str, dict[str, str]]]:
        """The next Redis entries (waiting up to ``wait_s``); without Redis, a sleep of
        ``wait_s`` and, every :data:`REDIS_RETRY_S`, a new try to connect."""
        if self.redis is None:
            await anyio.sleep(wait_s)
            if time.monotonic() >= self.redis_retry_at:
                self.redis_retry_at = time.monotonic() + REDIS_RETRY_S
                await self._open_redis()
                # What was committed before the noted entry comes from the database.
                self.read_db_now = self.redis is not None
            return []
        try:
            return await self._read_redis(wait_s)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.info("job %s events: Redis failed (%s); reading the database every %g s",
                     self.job_id, type(exc).__name__, self.settings.events_poll_s)
            client, self.redis = self.redis, None
            await self._close(client)
            self.read_db_now = True
            self.redis_retry_at = time.monotonic() + REDIS_RETRY_S
            return []


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that ends the stream as soon as the client disconnects: the
    body's iterator is cancelled and closed (its ``finally`` blocks run), then ``on_close``
    (the quota slot's release) runs, whatever happened."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(chunks, headers=HEADERS, media_type="text/event-stream")
        self._chunks = chunks
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _count(streams=1)
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for chunk in self._chunks:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
                except OSError:  # the client went away while a chunk was being sent
                    pass
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            self._on_close()
            _count(streams=-1)
