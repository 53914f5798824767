"""A Python client of the LMForge HTTP API (``httpx``; docs/client.md has the examples).

    from lmforge.client import Client, LMForgeError

    with Client("http://127.0.0.1:8000", api_key="lmf_...") as lm:
        ds = lm.datasets.upload("data/tinyshakespeare/input.txt", name="shakespeare")
        job = lm.jobs.create({"dataset_id": ds["id"], "training": {"max_steps": 500}})
        for event in lm.jobs.events(job["id"]):        # resumes by itself after a drop
            if event.event == "metrics":
                print(event.data["step"], event.data["train_loss"])
        path = lm.checkpoints.download(job["id"], "best", "model.safetensors")

Every method returns the API's JSON as plain ``dict``/``list`` (the shapes are in the API's
OpenAPI document at ``/docs``), and every failure raises :class:`LMForgeError`, carrying the
API's ``error.code``, ``message`` and ``field`` (or, when the server was not reached,
``code="connection_failed"``). Importing this module loads neither torch nor the service's
code: it needs ``httpx`` and ``httpx-sse`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx
from httpx_sse import ServerSentEvent, connect_sse

__all__ = ["Client", "Event", "EventStream", "LMForgeError", "TERMINAL_STATUSES"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: A job in one of these has finished; its event stream ends with the status event.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: The dataset upload's format options (``POST /v1/datasets`` query parameters).
UPLOAD_OPTIONS = frozenset({"format", "text_field", "label_field", "columns"})
#: Bytes read per chunk while downloading a checkpoint.
DOWNLOAD_CHUNK = 1 << 20
#: Rows per page when paging through a job's metrics (the API's largest page).
METRICS_PAGE = 10_000
#: Seconds without a byte on an event stream before it is taken as dropped: the server sends
#: a heartbeat comment after 15 s without an event (docs/events.md).
EVENTS_READ_TIMEOUT_S = 60.0

Rows = list[dict[str, Any]]  # (an alias: the classes below have methods named list)


class LMForgeError(Exception):
    """A request that failed: the API's error (``code``, ``message``, ``field`` as in its
    ``{"error": {...}}`` body, ``status`` the HTTP status) or a client-side failure:
    ``connection_failed`` (no answer from the server; ``status`` None),
    ``checksum_mismatch`` (a download whose sha256 is not the API's), ``no_checkpoint``,
    ``stream_failed`` (the event stream could not be resumed)."""

    def __init__(self, code: str, message: str, *, field: str | None = None,
                 status: int | None = None, details: list[dict[str, Any]] | None = None,
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status
        self.details = details or []
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        http = f" [HTTP {self.status}]" if self.status is not None else ""
        return f"{self.code}: {self.message}{where}{http}"

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field,
                "status": self.status, "details": self.details, "request_id": self.request_id}

    @classmethod
    def from_response(cls, response: httpx.Response) -> LMForgeError:
        """The error an API answer of 4xx/5xx carries (its body read first)."""
        try:
            body = response.json()
            err = body["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            text = response.text.strip().replace("\n", " ")[:300]
            return cls(f"http_{response.status_code}", text or response.reason_phrase,
                       status=response.status_code)
        retry = response.headers.get("Retry-After")
        return cls(code, message, field=err.get("field"), status=response.status_code,
                   details=err.get("details") or [], request_id=err.get("request_id")
                   or response.headers.get("X-Request-ID"),
                   retry_after=float(retry) if retry and retry.isdigit() else None)


@dataclass(frozen=True)
class Event:
    """One event of a job's stream (docs/events.md): ``event`` is ``status``, ``metrics``,
    ``checkpoint`` or ``warning``; ``data`` its JSON object; ``id`` its ``id:`` field when it
    has one (a metrics event's step, ``"<step>:<checkpoint id>"`` for a checkpoint)."""

    event: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def terminal(self) -> bool:
        """Whether this is the job's final status (the stream ends after it)."""
        return self.event == "status" and self.data.get("status") in TERMINAL_STATUSES


class Client:
    """The LMForge API at ``base_url`` (default ``$LMFORGE_URL``, else
    ``http://127.0.0.1:8000``) with ``api_key`` (default ``$LMFORGE_API_KEY``), sent as
    ``Authorization: Bearer``. ``timeout``: seconds for each request's connect, read and
    write (downloads and event streams read without a total limit). ``page_size``: items
    per request when paging through a list (the API allows 1-500). ``transport``: an
    ``httpx`` transport (tests). Use it as a context manager, or call :meth:`close`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, page_size: int = 500,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.page_size = page_size
        self.base_url = (base_url or os.environ.get("LMFORGE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("LMFORGE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 transport=transport)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.checkpoints = Checkpoints(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- plumbing -----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, expect: Sequence[int] = (200,),
                **kwargs: Any) -> httpx.Response:
        """Send one request; raises :class:`LMForgeError` unless the status is in
        ``expect``."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _connection_error(self.base_url, exc) from exc
        if response.status_code not in expect:
            raise LMForgeError.from_response(response)
        return response

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status", "database", "broker"}`` (no key needed)."""
        response = self.request("GET", "/healthz", expect=(200, 503))
        data: dict[str, Any] = response.json()
        return data

    def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> list[Any]:
        """Every item of a paged list (``data``, ``has_more``, ``next_after``), newest first,
        at most ``limit``."""
        out: list[Any] = []
        params = {k: v for k, v in params.items() if v is not None}
        params["limit"] = self.page_size
        while True:
            page = self.get_json(path, params=params)
            out.extend(page["data"])
            if limit is not None and len(out) >= limit:
                return out[:limit]
            if not page.get("has_more") or not page.get("next_after"):
                return out
            params["after"] = page["next_after"]


def _connection_error(url: str, exc: Exception) -> LMForgeError:
    return LMForgeError("connection_failed",
                        f"no answer from {url} ({type(exc).__name__}: {exc or 'no detail'}); "
                        "is the service running there (lmforge up), and is --url / "
                        "LMFORGE_URL right?")


class Datasets:
    """``/v1/datasets``."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(self, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
               name: str | None = None, idempotency_key: str | None = None,
               **format_options: str) -> dict[str, Any]:
        """Upload one file, or several joined in order as one dataset (``POST
        /v1/datasets``, multipart, streamed from disk). ``format_options``: ``format``
        (``text``, ``jsonl``, ``csv``, ``tsv``), ``text_field``, ``label_field``,
        ``columns`` (README "Datasets"). Returns the dataset (its ``id``, counts and
        statistics). Raises :class:`LMForgeError` (e.g. 413 past the upload limit, 422
        naming the file, line and field) and ``TypeError`` for an unknown option."""
        unknown = set(format_options) - UPLOAD_OPTIONS
        if unknown:
            raise TypeError(f"unknown upload option(s) {sorted(unknown)}; the options are "
                            f"{sorted(UPLOAD_OPTIONS)}")
        paths = [Path(path)] if isinstance(path, str | os.PathLike) else [Path(p) for p in path]
        if not paths:
            raise ValueError("no file to upload")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with contextlib.ExitStack() as stack:
            files: list[tuple[str, tuple[str, BinaryIO, str]]] = [
                ("file", (p.name, stack.enter_context(p.open("rb")), "application/octet-stream"))
                for p in paths]
            data = {"name": name} if name else {}
            response = self._c.request("POST", "/v1/datasets", expect=(200, 201), files=files,
                                       data=data, params=format_options, headers=headers)
        out: dict[str, Any] = response.json()
        return out

    def list(self, limit: int | None = None) -> Rows:
        """Every dataset the key may see, newest first (all pages; at most ``limit``)."""
        return self._c._pages("/v1/datasets", {}, limit)

    def get(self, dataset_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._c.get_json(f"/v1/datasets/{dataset_id}")
        return out

    def delete(self, dataset_id: str) -> None:
        """``DELETE /v1/datasets/{id}``; 409 ``dataset_in_use`` while a job reads it."""
        self._c.request("DELETE", f"/v1/datasets/{dataset_id}", expect=(204,))


class Jobs:
    """``/v1/jobs``."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        """Submit a job (``POST /v1/jobs``): the job, ``queued``, with its spec's defaults
        filled in. ``idempotency_key``: a retry with the same key and spec returns the job
        the first request created. ``dry_run``: only the estimate (vocabulary, parameters,
        memory, seconds per step), nothing created."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._c.request("POST", "/v1/jobs", expect=(200, 201), json=dict(spec),
                                   headers=headers,
                                   params={"dry_run": "true"} if dry_run else None)
        out: dict[str, Any] = response.json()
        return out

    def get(self, job_id: str) -> dict[str, Any]:
        """The job: ``status``, ``progress`` (``step``, ``total_steps``, ``tokens_seen``,
        ``eta_s``, ``queue_position``), ``latest_metrics``, ``error``, ..."""
        out: dict[str, Any] = self._c.get_json(f"/v1/jobs/{job_id}")
        return out

    def list(self, status: str | None = None, limit: int | None = None) -> Rows:
        """Every job the key may see, newest first, paging through ``GET /v1/jobs``;
        ``status``: only jobs in it; at most ``limit``."""
        return self._c._pages("/v1/jobs", {"status": status}, limit)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel (202): a queued job at once, a running one at its next step (it keeps a
        ``last`` checkpoint). 409 ``job_finished`` for a finished job."""
        out: dict[str, Any] = self._c.request("POST", f"/v1/jobs/{job_id}/cancel",
                                              expect=(200, 202)).json()
        return out

    def result(self, job_id: str) -> dict[str, Any]:
        """The outcome of a finished job (409 ``job_not_finished`` before)."""
        out: dict[str, Any] = self._c.get_json(f"/v1/jobs/{job_id}/result")
        return out

    def metrics(self, job_id: str, resolution: int | None = None, *, metric: str | None = None,
                after_step: int = 0) -> Rows:
        """The job's metric rows in step order. Without ``resolution``: every row after
        ``after_step`` (all pages). With it: at most ``resolution`` rows that keep the
        curve's shape (min and max of ``metric`` per bucket, default ``train_loss``; see
        docs/client.md)."""
        path = f"/v1/jobs/{job_id}/metrics"
        if resolution is not None:
            params: dict[str, Any] = {"resolution": resolution, "after_step": after_step}
            if metric is not None:
                params["metric"] = metric
            rows: Rows = self._c.get_json(path, params=params)["data"]
            return rows
        out: Rows = []
        while True:
            page = self._c.get_json(path, params={"after_step": after_step,
                                                  "limit": METRICS_PAGE})
            out.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                return out
            after_step = page["data"][-1]["step"]

    def metrics_csv(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        """Every metric row as CSV (``GET /v1/jobs/{id}/metrics.csv``), streamed to
        ``path``."""
        target = Path(path)
        with _atomic_file(target) as (fh, _):
            self._stream_to(f"/v1/jobs/{job_id}/metrics.csv", fh)
        return target

    def _stream_to(self, url: str, fh: BinaryIO) -> None:
        try:
            with self._c.http.stream("GET", url) as response:
                if response.status_code != 200:
                    response.read()
                    raise LMForgeError.from_response(response)
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                    fh.write(chunk)
        except httpx.TransportError as exc:
            raise _connection_error(self._c.base_url, exc) from exc

    def checkpoints(self, job_id: str) -> Rows:
        """The job's checkpoints (``best``, ``last``, ``periodic``), by step."""
        rows: Rows = self._c.get_json(f"/v1/jobs/{job_id}/checkpoints")["data"]
        return rows

    def events(self, job_id: str, *, after_step: int | None = None,
               last_event_id: str | None = None, max_retries: int = 20,
               read_timeout: float = EVENTS_READ_TIMEOUT_S) -> EventStream:
        """The job's event stream (``GET /v1/jobs/{id}/events``, docs/events.md) as an
        iterator of :class:`Event`, ending after the job's terminal ``status``. A dropped
        connection is resumed by itself with ``Last-Event-ID`` (no event lost or repeated:
        see :class:`EventStream`). ``after_step``: start after this step (the history before
        it is skipped); ``last_event_id``: resume where an earlier stream stopped."""
        return EventStream(self._c, job_id, after_step=after_step,
                           last_event_id=last_event_id, max_retries=max_retries,
                           read_timeout=read_timeout)

    def wait(self, job_id: str, *, on_event: Callable[[Event], None] | None = None
             ) -> dict[str, Any]:
        """Follow the job's events until it finishes (from its current step on: the history
        before it is not fetched); returns the job as it ended."""
        job = self.get(job_id)
        if job["status"] in TERMINAL_STATUSES:
            return job
        with self.events(job_id, after_step=(job.get("progress") or {}).get("step")) as stream:
            for event in stream:
                if on_event is not None:
                    on_event(event)
        return self.get(job_id)

    def _inference(self, job_id: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._c.request("POST", f"/v1/jobs/{job_id}/{route}",
                                              json=body).json()
        return out

    def generate(self, job_id: str, prompt: str = "", **params: Any) -> dict[str, Any]:
        """Sample continuations of ``prompt`` from the job's checkpoint (``POST
        /v1/jobs/{id}/generate``): ``params`` as the API takes them (``max_new_tokens``,
        ``num_samples``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``checkpoint``,
        ``deadline_s``)."""
        return self._inference(job_id, "generate", {"prompt": prompt, **params})

    def score(self, job_id: str, text: str, **params: Any) -> dict[str, Any]:
        """Cross-entropy of ``text`` in nats per token, its perplexity (and bits per
        character for char jobs), per token (``POST /v1/jobs/{id}/score``)."""
        return self._inference(job_id, "score", {"text": text, **params})

    def classify(self, job_id: str, texts: Sequence[str], **params: Any) -> dict[str, Any]:
        """A classifier job's label and probabilities for each of ``texts`` (``POST
        /v1/jobs/{id}/classify``)."""
        return self._inference(job_id, "classify", {"texts": list(texts), **params})


class EventStream:
    """A job's events (docs/events.md), resumed across dropped connections.

    Iterating yields :class:`Event` objects until the job's terminal ``status`` event (then
    the server closes the stream and iteration stops). When the connection drops (a network
    error, a read with no byte for ``read_timeout`` seconds although the server sends a
    heartbeat every 15 s, the server restarting, a 502/503/504), it reconnects after a short
    back-off (0.5 s doubling to 10 s, or the server's ``retry:``) with ``Last-Event-ID`` set
    to the last ``id:`` received, so the server sends exactly what came after it. Events are
    also checked on this side: a metrics step at or below the last one yielded, a checkpoint
    id or a warning already yielded, and a ``status`` equal to the last one yielded (the
    server repeats the current status first on every connection) are skipped. After
    ``max_retries`` failed reconnections in a row it raises :class:`LMForgeError`
    (``stream_failed``); an API error (401, 404, 422, 429) is raised at once.

    ``last_event_id`` and ``reconnects`` tell where it stands. Close it (or use ``with``)
    to drop the connection early."""

    def __init__(self, client: Client, job_id: str, *, after_step: int | None = None,
                 last_event_id: str | None = None, max_retries: int = 20,
                 read_timeout: float = EVENTS_READ_TIMEOUT_S) -> None:
        self._c = client
        self.job_id = job_id
        self.after_step = after_step
        self.last_event_id = last_event_id
        self.max_retries = max_retries
        self.read_timeout = read_timeout
        self.reconnects = 0
        self._response: httpx.Response | None = None
        self._closed = False
        self._last_step = -1
        self._last_status: dict[str, Any] | None = None
        self._seen: set[str] = set()  # checkpoint ids and warnings already yielded
        self._retry_s: float | None = None
        self._iter = self._events()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._iter)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection; iteration stops."""
        self._closed = True
        response = self._response
        if response is not None:  # also from another thread: its blocked read then fails
            response.close()
        with contextlib.suppress(ValueError):  # "generator already executing" (other thread)
            self._iter.close()

    def _request_args(self) -> tuple[dict[str, str], dict[str, Any]]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        params: dict[str, Any] = {}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        elif self.after_step is not None:
            params["after_step"] = self.after_step
        return headers, params

    def _events(self) -> Generator[Event, None, None]:
        failures = 0
        while not self._closed:
            try:
                for event in self._connection():
                    failures = 0
                    yield event
                    if event.terminal:
                        return
            except (httpx.TransportError, httpx.StreamError, _Retry) as exc:
                if self._closed:
                    return
                if isinstance(exc, httpx.StreamError):
                    raise
                failures += 1
                if failures > self.max_retries:
                    cause = exc.error if isinstance(exc, _Retry) else exc
                    raise LMForgeError(
                        "stream_failed", f"the event stream of job {self.job_id} dropped and "
                        f"{self.max_retries} reconnections failed (last: {cause})") from exc
            if self._closed:
                return
            # Dropped, or ended without the terminal status: resume where it stopped.
            self.reconnects += 1
            time.sleep(self._retry_s if self._retry_s is not None
                       else min(10.0, 0.5 * 2 ** max(0, failures - 1)))

    def _connection(self) -> Iterator[Event]:
        """The new events of one connection, until it ends. Raises :class:`_Retry` for a
        502/503/504 and :class:`LMForgeError` for another error answer."""
        headers, params = self._request_args()
        timeout = httpx.Timeout(self._c.http.timeout.connect or 30.0, read=self.read_timeout)
        try:
            with connect_sse(self._c.http, "GET", f"/v1/jobs/{self.job_id}/events",
                             headers=headers, params=params, timeout=timeout) as source:
                self._response = response = source.response
                if response.status_code != 200:
                    response.read()
                    error = LMForgeError.from_response(response)
                    raise _Retry(error) if response.status_code in (502, 503, 504) else error
                for sse in source.iter_sse():
                    event = self._accept(sse)
                    if event is not None:
                        yield event
        finally:
            self._response = None

    def _accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to yield for ``sse``, or None when it is one already yielded."""
        if sse.id:
            self.last_event_id = sse.id
        if sse.retry is not None:
            self._retry_s = sse.retry / 1000
        if not sse.event or (sse.event == "message" and not sse.data):
            return None
        try:
            data = json.loads(sse.data) if sse.data else {}
        except ValueError:
            data = {"raw": sse.data}
        if not isinstance(data, dict):
            data = {"value": data}
        if not self._is_new(sse.event, data):
            return None
        # Only metrics and checkpoint events carry an id of their own; httpx-sse repeats the
        # last id seen (the SSE "last event ID buffer") on the others.
        return Event(sse.event, data, sse.id or None
                     if sse.event in ("metrics", "checkpoint") else None)

    def _is_new(self, kind: str, data: dict[str, Any]) -> bool:
        if kind == "metrics":
            step = data.get("step")
            if isinstance(step, int):
                if step <= self._last_step:
                    return False
                self._last_step = step
        elif kind == "status":
            if data == self._last_status:
                return False
            self._last_status = data
        elif kind in ("checkpoint", "warning"):
            key = (f"checkpoint:{data.get('id')}" if kind == "checkpoint"
                   else "warning:" + json.dumps(data, sort_keys=True))
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


class _Retry(Exception):
    def __init__(self, error: LMForgeError) -> None:
        super().__init__(str(error))
        self.error = error


class Checkpoints:
    """A job's checkpoint files."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def find(self, job_id: str, which: str = "best") -> dict[str, Any]:
        """The checkpoint row ``which`` of the job: ``best``/``last`` is the newest of that
        kind (``no_checkpoint`` when there is none yet), else a checkpoint id."""
        rows = self._c.jobs.checkpoints(job_id)
        if which in ("best", "last"):
            kind = [r for r in rows if r["kind"] == which]
            if not kind:
                raise LMForgeError("no_checkpoint", f"job {job_id} has no {which} checkpoint "
                                   f"yet (it has {len(rows)} checkpoint(s): "
                                   f"{sorted({r['kind'] for r in rows}) or 'none'})",
                                   field="checkpoint")
            return max(kind, key=lambda r: (r["step"], r["created_at"]))
        for row in rows:
            if row["id"] == which:
                return row
        raise LMForgeError("not_found", f"checkpoint {which!r} of job {job_id} not found",
                           field="checkpoint", status=404)

    def download(self, job_id: str, which: str = "best",
                 path: str | os.PathLike[str] | None = None, *,
                 on_progress: Callable[[int, int], None] | None = None) -> Path:
        """Download the checkpoint ``which`` (``best``, ``last`` or an id) of the job to
        ``path`` (a file, or a directory to put ``<job>-<kind>-step<N>.safetensors`` in;
        default: that name in the current directory), streamed to a temporary file beside
        it while its sha256 is computed. Only when the bytes' sha256 and length equal the
        API's (the checkpoint row's ``sha256``/``bytes``, which the download's
        ``X-Checkpoint-SHA256`` header must repeat) is the file renamed to ``path``;
        otherwise the temporary file is removed and :class:`LMForgeError`
        ``checksum_mismatch`` is raised, so no partial or wrong file is ever left.
        ``on_progress(bytes_done, bytes_total)`` is called after each chunk."""
        row = self.find(job_id, which)
        name = f"{job_id}-{row['kind']}-step{row['step']}.safetensors"
        target = Path(path) if path is not None else Path(name)
        if target.is_dir():
            target = target / name
        url = f"/v1/jobs/{job_id}/checkpoints/{row['id']}/download"
        expected, total = str(row["sha256"]), int(row["bytes"])
        with _atomic_file(target) as (fh, commit):
            digest = hashlib.sha256()
            done = 0
            try:
                # follow_redirects: with LMFORGE_DOWNLOAD_PRESIGN_S the API answers 307 to a
                # presigned object-store URL (httpx drops the API key on the way there).
                with self._c.http.stream("GET", url, follow_redirects=True) as response:
                    if response.status_code != 200:
                        response.read()
                        raise LMForgeError.from_response(response)
                    header = response.headers.get("X-Checkpoint-SHA256")
                    if header is not None and header != expected:
                        raise LMForgeError(
                            "checksum_mismatch", f"checkpoint {row['id']}: the download's "
                            f"X-Checkpoint-SHA256 {header} is not the API's {expected}")
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, total)
            except httpx.TransportError as exc:
                raise _connection_error(self._c.base_url, exc) from exc
            got = digest.hexdigest()
            if got != expected or done != total:
                raise LMForgeError(
                    "checksum_mismatch", f"checkpoint {row['id']}: downloaded {done} bytes "
                    f"with sha256 {got}, but the API says {total} bytes with sha256 "
                    f"{expected}; nothing was written to {target}")
            commit()
        return target


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[tuple[BinaryIO, Callable[[], None]]]:
    """A temporary file beside ``target`` and a ``commit()`` that renames it to ``target``
    (``os.replace``: atomic on one file system). Left uncommitted, or on any exception, the
    temporary file is removed; ``target`` is never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    committed = False

    def commit() -> None:
        nonlocal committed
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, target)
        committed = True

    fh = os.fdopen(fd, "wb")
    try:
        yield fh, commit
        if not committed:
            commit()
    finally:
        if not committed:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
