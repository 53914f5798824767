"""The service's log format: text (the default) or one JSON object per line
(``LMFORGE_LOG_FORMAT=json``), each record carrying the job id and the request id.

- ``record.job_id``: the job this record is about, from :data:`JOB_ID` (set by
  :func:`job_log_context` around a job's run in the worker, and by the API's request-id
  middleware for a request whose path names a job), ``"-"`` otherwise.
- ``record.request_id``: the API request's id (``app.middleware``, ``X-Request-ID``), ``"-"``
  outside a request and in the worker.

A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``,
``request_id`` and ``job_id`` (null when none), ``process`` (pid), ``thread``, ``exc_info``
(the formatted traceback, when there is one) and any other ``extra=`` attributes a call gave
whose values JSON can hold. The standard library's :mod:`logging` only: a small formatter,
no dependency.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

#: The job the current code runs or serves (None: none).
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmforge_job_id",
                                                                    default=None)
JOB_ID_IN_PATH = re.compile(r"/jobs/(job_[0-9a-f]{32})(?:/|$)")
# What the API's record factory prefixes to a request's messages (app.middleware); a JSON line
# carries the id in its own field instead.
_REQUEST_PREFIX = re.compile(r"^\[request [A-Za-z0-9._:-]{1,128}\] ")

# LogRecord's own attributes: everything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "job_id", "taskName"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def job_log_context(job_id: str) -> Iterator[None]:
    """Every record made inside (in this thread, and in threads started with a copy of this
    context) carries ``job_id``."""
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = _REQUEST_PREFIX.sub("", record.getMessage(), count=1)
        rid = getattr(record, "request_id", None)
        jid = getattr(record, "job_id", None)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "request_id": None if rid in (None, "-") else rid,
            "job_id": None if jid in (None, "-") else jid,
            "process": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = _jsonable(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


_installed = False


def install_job_ids() -> None:
    """Make every record carry ``record.job_id`` (:data:`JOB_ID`, ``"-"`` when unset) and
    ``record.request_id`` (``"-"`` unless the API's factory set it). Idempotent."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "job_id"):
            record.job_id = JOB_ID.get() or "-"
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def log_format(value: str | None = None) -> str:
    """``json`` or ``text``: ``value``, else ``LMFORGE_LOG_FORMAT``, else ``text``. Raises
    ``ValueError`` for anything else."""
    fmt = (value if value is not None else os.environ.get("LMFORGE_LOG_FORMAT", "text"))
    fmt = fmt.strip().lower() or "text"
    if fmt not in ("json", "text"):
        raise ValueError(f"LMFORGE_LOG_FORMAT must be 'json' or 'text', not {fmt!r}")
    return fmt


def make_formatter(fmt: str | None = None) -> logging.Formatter:
    """The formatter of ``fmt`` (:func:`log_format`)."""
    return JsonFormatter() if log_format(fmt) == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(fmt: str | None = None, level: int = logging.INFO) -> None:
    """The root logger writes to stderr in ``fmt`` (:func:`log_format`) at ``level``, and
    every record carries the job and request ids. Replaces the root's handlers (what
    ``logging.basicConfig`` would install)."""
    install_job_ids()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
