"""Long runs: a job's metric curve downsampled in the database, every row as CSV, and the
``eta_s``/``queue_position`` of a job's ``progress``.

Downsampling (``GET /v1/jobs/{id}/metrics?resolution=N``) is **min/max per bucket**: the
steps are cut into ``B = (N - 2) // 2`` buckets of equal width, and each bucket keeps the
row with the smallest and the row with the largest value of the chosen metric (one row when
they coincide); the first and the last row are kept too, so at most ``2 B + 2 <= N`` rows
come back, in step order, each a whole metric row as ``GET /v1/jobs/{id}/metrics`` gives it.
Why not LTTB (Steinarsson 2013, "Downsampling Time Series for Visual Representation", the
Largest-Triangle-Three-Buckets algorithm): LTTB picks per bucket the point that makes the
largest triangle with the point picked in the bucket before, so each choice depends on the
previous one and the algorithm is a sequential pass that would need every row in Python; it
also keeps a spike only when the spike wins its triangle. Min/max per bucket runs in SQL
where the rows are stored (no row becomes a Python object but the ones returned: see
:func:`downsample`), and it keeps every bucket's extremes by construction: a loss spike, or
the minimum of a validation curve, is never smoothed away. That is what a loss curve is read
for (docs/benchmarks.md has the time on a million-step job).

Only rows where the metric is a number take part (``metric=val_loss`` downsamples the
validation curve, whose rows exist only on evaluation steps); a row whose value is null or
not a number is skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from core.contract import StepMetrics
from core.errors import ValidationFailed
from core.eta import eta_seconds
from store.models import Job, JobStatus, Metric
from store.queue import stored_route

#: The lowest ``resolution`` accepted: one bucket's min and max plus the first and last row.
MIN_RESOLUTION = 4
MAX_RESOLUTION = 100_000
#: A metric name in ``?metric=``: the keys the engines report (``train_loss``, ``val_ppl``).
METRIC_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
#: Rows fetched per round trip while streaming the CSV.
CSV_BATCH_ROWS = 5000
#: The metric rows the ETA's rate is measured over (the newest ones of the current run).
ETA_WINDOW_ROWS = 100


@dataclasses.dataclass(frozen=True)
class Downsampled:
    """The rows kept, in step order, and how they were chosen: ``total`` is how many rows the
    job has past ``after_step`` (with or without the metric), ``buckets`` how many buckets
    they were cut into (0: they all fitted in the resolution, and every one with a number
    for the metric came back)."""

    rows: list[Metric]
    total: int
    buckets: int


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_type(session: Session, metric: str) -> ColumnElement[Any]:
    """The JSON type of ``values[metric]`` (SQL NULL when the key is missing): SQLite's
    ``json_type`` ("real", "integer", "null", "text", "object", ...) or PostgreSQL's
    ``json_typeof`` ("number", "null", "string", "object", ...)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.json_typeof(Metric.values.op("->")(metric))
    return func.json_type(Metric.values, _sqlite_path(metric))


def _sqlite_path(metric: str) -> str:
    return f'$."{metric}"'  # metric matches METRIC_PATTERN: no quote can reach the path


def _edge(session: Session, job_id: str, after_step: int, metric: str,
          last: bool) -> tuple[int, str] | None:
    """The first (``last``: the last) step past ``after_step`` whose row has a non-null
    ``metric``, and that value's JSON type; None when no row has one. Reads rows from that
    end of the job until one has it (the primary key's order)."""
    kind = _json_type(session, metric)
    found = session.execute(
        select(Metric.step, kind)
        .where(Metric.job_id == job_id, Metric.step > after_step, kind != "null")
        .order_by(Metric.step.desc() if last else Metric.step).limit(1)).first()
    return None if found is None else (int(found[0]), str(found[1]))


def downsample(session: Session, job_id: str, resolution: int, metric: str,
               after_step: int = 0) -> Downsampled:
    """At most ``resolution`` (>= :data:`MIN_RESOLUTION`) of job ``job_id``'s metric rows with
    a step past ``after_step`` and a number for ``metric``, chosen by min/max per bucket
    (module docstring), in step order. The caller checks ownership.

    Cost: the range and count from the primary key alone; the first and last row with the
    metric; then, when the rows do not all fit, one pass over the job's rows per extreme
    (SQLite: per bucket, an index range scan keeping its min (max) row, so the database
    neither sorts nor hands over more than ``resolution`` rows; PostgreSQL: one pass with
    a hash aggregate per bucket), and one query loading the rows kept. Raises
    :class:`ValidationFailed` (field ``metric``) when the metric's values are not numbers
    (e.g. ``val_per_class``)."""
    lo, hi, total = session.execute(
        select(func.min(Metric.step), func.max(Metric.step), func.count())
        .where(Metric.job_id == job_id, Metric.step > after_step)).one()
    first = _edge(session, job_id, after_step, metric, last=False) if total else None
    if first is None:
        return Downsampled([], int(total or 0), 0)
    if first[1] not in ("real", "integer", "number"):
        raise ValidationFailed(f"metric {metric!r} of job {job_id} is not a number (its "
                               f"values are JSON {first[1]}); pick a numeric one such as "
                               "train_loss or val_loss", field="metric")
    if total <= resolution:
        steps: set[int] = set()
        buckets = 0
    else:
        buckets = (resolution - 2) // 2
        last = _edge(session, job_id, after_step, metric, last=True)
        steps = {first[0], last[0] if last is not None else first[0]}
        if session.get_bind().dialect.name == "sqlite":
            steps.update(_sqlite_extremes(session, job_id, metric, lo, hi, buckets))
        else:
            steps.update(_postgres_extremes(session, job_id, metric, lo, hi, buckets))
    rows = _load(session, job_id, after_step, sorted(steps) if buckets else None)
    return Downsampled([r for r in rows if _is_number(r.values.get(metric))], int(total),
                       buckets)


def _load(session: Session, job_id: str, after_step: int,
          steps: list[int] | None) -> list[Metric]:
    """The job's rows at ``steps`` (None: every row past ``after_step``), in step order."""
    if steps is None:
        return list(session.scalars(select(Metric).where(
            Metric.job_id == job_id, Metric.step > after_step).order_by(Metric.step)))
    rows: list[Metric] = []
    for i in range(0, len(steps), 900):  # SQLite's bound parameters: stay well under
        rows.extend(session.scalars(select(Metric).where(
            Metric.job_id == job_id, Metric.step.in_(steps[i:i + 900]))))
    rows.sort(key=lambda r: r.step)
    return rows


#: Bucket ``i`` of ``B`` over steps ``lo .. lo + span - 1`` holds the steps with
#: ``floor((step - lo) * B / span) == i``, i.e. ``lo + ceil(i * span / B) <= step <
#: lo + ceil((i + 1) * span / B)`` (integer arithmetic; SQLite's integers are 64-bit).
_SQLITE_EXTREMES = """
WITH RECURSIVE b(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM b WHERE i + 1 < :buckets)
SELECT
  (SELECT step FROM (SELECT step, {agg}(json_extract("values", :path))
                     FROM metrics WHERE job_id = :job_id
                       AND step >= :lo + (i * :span + :buckets - 1) / :buckets
                       AND step < :lo + ((i + 1) * :span + :buckets - 1) / :buckets))
FROM b
"""


def _sqlite_extremes(session: Session, job_id: str, metric: str, lo: int, hi: int,
                     buckets: int) -> set[int]:
    """The step of each bucket's min and max row (SQLite). A query with exactly one
    ``min()``/``max()`` aggregate takes its bare columns from the row holding that
    extreme (SQLite's documented "bare columns in an aggregate query" rule), so per bucket
    one index range scan finds the step, parsing each row's JSON once; a bucket without a
    number gives NULL or a row that the caller's number check drops."""
    params = {"buckets": buckets, "path": _sqlite_path(metric), "job_id": job_id, "lo": lo,
              "span": hi - lo + 1}
    out: set[int] = set()
    for agg in ("min", "max"):
        out.update(s for s in session.scalars(text(_SQLITE_EXTREMES.format(agg=agg)), params)
                   if s is not None)
    return out


_POSTGRES_EXTREMES = """
SELECT min(ARRAY[v, step]), max(ARRAY[v, -step])
FROM (SELECT step::float8 AS step,
             CASE WHEN json_typeof(j) = 'number' THEN (j::text)::float8 END AS v,
             (step - :lo)::bigint * :buckets / :span AS bucket
      FROM (SELECT step, "values" -> CAST(:metric AS text) AS j FROM metrics
            WHERE job_id = :job_id AND step >= :lo OFFSET 0) AS fenced) AS numbered
WHERE v IS NOT NULL
GROUP BY bucket
"""


def _postgres_extremes(session: Session, job_id: str, metric: str, lo: int, hi: int,
                       buckets: int) -> set[int]:
    """The step of each bucket's min and max row (PostgreSQL), in one pass: each row's JSON
    is read once (``OFFSET 0`` keeps the planner from inlining the extraction into every
    use), and per bucket (a hash aggregate, no sort) ``min(ARRAY[value, step])`` is the
    lowest value's row with the smallest step, ``max(ARRAY[value, -step])`` the highest
    value's with the smallest step (arrays compare element by element; steps are exact in
    float8 below 2^53). Rows whose value is not a JSON number are left out before the
    cast."""
    params = {"lo": lo, "buckets": buckets, "span": hi - lo + 1, "metric": metric,
              "job_id": job_id}
    out: set[int] = set()
    for low, high in session.execute(text(_POSTGRES_EXTREMES), params):
        out.update((int(low[1]), int(-high[1])))
    return out


# -- CSV --------------------------------------------------------------------------------------


def _metric_keys(session: Session, job_id: str) -> list[str]:
    """Every metric name of the job's rows: the language model's (``core.contract``
    StepMetrics, in its order) first, then any other, sorted. One scan in SQL."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        sql = text('SELECT DISTINCT j.key FROM metrics, json_each(metrics."values") AS j '
                   "WHERE metrics.job_id = :job_id")
    elif dialect == "postgresql":
        sql = text('SELECT DISTINCT json_object_keys("values") FROM metrics '
                   "WHERE job_id = :job_id")
    else:  # another backend: read the keys row by row
        keys: set[str] = set()
        for values in session.scalars(select(Metric.values).where(Metric.job_id == job_id)
                                      .execution_options(yield_per=CSV_BATCH_ROWS)):
            keys.update(values)
        return _ordered_keys(keys)
    return _ordered_keys(set(session.scalars(sql, {"job_id": job_id})))


def _ordered_keys(keys: Iterable[str]) -> list[str]:
    known = [f.name for f in dataclasses.fields(StepMetrics) if f.name != "step"]
    rest = sorted(set(keys) - set(known) - {"step"})
    return ["step", *known, *rest]


def _cell(value: Any) -> Any:
    """A CSV cell: empty for null, ``repr`` for a float (it reads back to the same float),
    JSON for a nested value."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def csv_rows(factory: sessionmaker[Session], job_id: str) -> Iterator[bytes]:
    """Job ``job_id``'s metric rows as CSV (UTF-8, ``\\r\\n`` line ends, a header row: ``step``
    then every metric name, :func:`_metric_keys`), streamed :data:`CSV_BATCH_ROWS` rows at a
    time from a session of its own (the request's is closed by the time the body is sent). A
    value missing from a row is an empty cell. The caller checks ownership first."""
    with factory() as session:
        keys = _metric_keys(session, job_id)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(keys)
        result = session.execute(
            select(Metric.step, Metric.values).where(Metric.job_id == job_id)
            .order_by(Metric.step).execution_options(yield_per=CSV_BATCH_ROWS))
        for partition in result.partitions():
            for step, values in partition:
                writer.writerow([step, *(_cell(values.get(k)) for k in keys[1:])])
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue().encode()


# -- progress: eta_s and queue_position -------------------------------------------------------


def recent_rows(session: Session, job_id: str, limit: int = ETA_WINDOW_ROWS
                ) -> list[dict[str, Any]]:
    """The job's newest ``limit`` metric rows, newest first, as ``{"step", **values}``."""
    rows = session.execute(select(Metric.step, Metric.values).where(Metric.job_id == job_id)
                           .order_by(Metric.step.desc()).limit(limit))
    return [{**values, "step": step} for step, values in rows]


def queue_positions(session: Session, job_ids: Iterable[str]) -> dict[str, int]:
    """The position in its queue (1: the next job a free worker of that queue takes) of each
    of ``job_ids`` that is queued, among every principal's queued jobs on the same Celery
    queue (``store.queue.stored_route``: ``resources`` and ``priority`` of the stored spec).
    Within a queue: the higher ``priority`` first (the broker serves lower broker priorities
    first, ``store.queue``); within a priority by ``enqueued_at``, the time its message was
    last handed to the broker (a job requeued after a worker shutdown goes to the back, as
    its message does), then the jobs whose message is not in the broker yet (``enqueued_at``
    NULL: the queued sweep hands them over later) by ``created_at``. Celery takes messages in
    this order with ``worker_prefetch_multiplier=1``; a worker's claim may still overtake by a
    second, and a worker that serves several queues interleaves them. One query over the
    queued jobs' routing fields (``resources``, ``priority``, ``training.device``)."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    rows = session.execute(
        select(Job.id, Job.spec["resources"], Job.spec["priority"],
               Job.spec["training"]["device"], Job.enqueued_at, Job.created_at)
        .where(Job.status == JobStatus.QUEUED))
    keyed = []
    for job_id, resources, priority, device, enqueued_at, created_at in rows:
        route = stored_route({"resources": resources, "priority": priority,
                              "training": {} if device is None else {"device": device}})
        keyed.append((route.queue, route.broker_priority, enqueued_at is None,
                      enqueued_at or created_at, created_at, job_id))
    keyed.sort()
    out: dict[str, int] = {}
    position, queue = 0, None
    for key in keyed:
        position = position + 1 if key[0] == queue else 1
        queue = key[0]
        if key[-1] in wanted:
            out[key[-1]] = position
    return out


def progress_extras(session: Session, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """``{"eta_s", "queue_position"}`` for each of ``jobs``: ``eta_s`` for a running job
    (:func:`eta_seconds`), ``queue_position`` for a queued one (:func:`queue_positions`),
    null otherwise."""
    positions = queue_positions(session, [j.id for j in jobs if j.status == JobStatus.QUEUED])
    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        eta = (eta_seconds(job.spec, recent_rows(session, job.id))
               if job.status == JobStatus.RUNNING else None)
        out[job.id] = {"eta_s": eta, "queue_position": positions.get(job.id)}
    return out
