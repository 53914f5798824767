"""A job's integrations (``spec.integrations``): TensorBoard event files and an MLflow run, fed
by the runner's hooks (docs/operations.md, "Integrations").

- ``{"kind": "tensorboard"}``: every metric row becomes scalars (one tag per metric name:
  ``train_loss``, ``val_loss``, ``lr``, ``tokens_per_s``, ...; the step as TensorBoard's step),
  written with ``torch.utils.tensorboard.SummaryWriter`` into a folder of the pool process and
  uploaded to storage as one ``.tar.gz`` (:func:`store.integrations.tensorboard_key`) at each
  checkpoint and at the end, where ``GET /v1/jobs/{id}/tensorboard.tar.gz`` serves it. A
  resumed attempt unpacks the earlier files first and opens its writer with ``purge_step`` =
  its first step, so TensorBoard drops the replayed steps of the earlier files.
- ``{"kind": "mlflow", "tracking_uri": ...}``: a run in ``experiment_name`` (made when
  missing) tagged ``lmforge.job_id`` (a resumed attempt finds it again by that tag), the spec
  as params (flattened, ``model.hidden_dim``; ``notify`` and ``integrations`` left out: a
  webhook URL may hold a secret), each metric row as metrics at its step, and at the end the
  best checkpoint (else the last) as an artifact under ``checkpoints/``, then the run ended
  ``FINISHED``, ``FAILED`` or ``KILLED`` as the job. The MLflow client runs on a thread of
  its own, so a slow tracking server never slows a training step.

An integration that fails (library missing, server unreachable, URL refused) is switched off
for the rest of the attempt with one warning, ``{"code": "integration_failed",
"integration": kind, "message"}``, which the runner adds to the job's result ``warnings`` (the
event stream shows them); the job itself never fails because of one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.contract import MetricRow
from core.outbound import OutboundRefused, resolve_public
from core.spec import JobSpec, MlflowIntegration, TensorBoardIntegration
from store.db import session_scope
from store.integrations import tensorboard_key
from store.models import Checkpoint, CheckpointKind, JobStatus
from store.settings import Settings
from store.storage import Storage

log = logging.getLogger(__name__)

#: Seconds the end of a run waits for the MLflow thread to send what it holds.
MLFLOW_FINISH_S = 120.0
#: Metric rows the MLflow thread may hold; past it the oldest are dropped (with a warning).
MLFLOW_QUEUE_ROWS = 100_000
#: MLflow's HTTP client retries a failed request this often (MLFLOW_HTTP_REQUEST_MAX_RETRIES;
#: its default of 7, with backoff, can take minutes) and waits this long for an answer.
MLFLOW_RETRIES, MLFLOW_TIMEOUT_S = "2", "30"
_MLFLOW_RUN_STATUS = {JobStatus.SUCCEEDED: "FINISHED", JobStatus.FAILED: "FAILED",
                      JobStatus.CANCELLED: "KILLED"}


def warning(kind: str, message: str) -> dict[str, Any]:
    return {"code": "integration_failed", "integration": kind, "message": message}


def scalars(row: MetricRow) -> dict[str, float]:
    """The finite numbers of a metric row by name (the step and non-numbers left out)."""
    out: dict[str, float] = {}
    for name, value in row.as_dict().items():
        if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[name] = float(value)
    return out


# -- TensorBoard ------------------------------------------------------------------------------


class TensorBoardSink:
    """Event files in ``workdir/<job_id>/``, uploaded to storage as a ``.tar.gz``."""

    kind = "tensorboard"

    def __init__(self, job_id: str, storage: Storage, workdir: Path) -> None:
        self.job_id, self.storage = job_id, storage
        self.logdir = workdir / job_id
        self.writer: Any = None

    def _open(self, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        key = tensorboard_key(self.job_id)
        self.logdir.mkdir(parents=True, exist_ok=True)
        purge: int | None = None
        if self.storage.exists(key):  # an earlier attempt's files: keep them
            with tarfile.open(fileobj=io.BytesIO(self.storage.read_bytes(key)),
                              mode="r:gz") as tar:
                tar.extractall(self.logdir.parent, filter="data")
            purge = first_step
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge)

    def on_metrics(self, rows: Sequence[MetricRow]) -> None:
        if not rows:
            return
        if self.writer is None:
            self._open(rows[0].step)
        for row in rows:
            for name, value in scalars(row).items():
                self.writer.add_scalar(name, value, global_step=row.step)

    def upload(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(self.logdir, arcname=self.job_id)
        self.storage.put_bytes(tensorboard_key(self.job_id), buf.getvalue())

    def on_checkpoint(self) -> None:
        self.upload()

    def finish(self, status: JobStatus | None, best: Callable[[], Path | None]) -> None:
        if self.writer is not None:
            self.upload()
            self.writer.close()


# -- MLflow -----------------------------------------------------------------------------------


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"hidden_dim": 64}}`` -> ``{"model.hidden_dim": "64"}``; lists as JSON;
    each value at most 500 characters."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:500]
    return out


class MlflowSink:
    """One MLflow run, fed by a thread of its own (see the module docstring)."""

    kind = "mlflow"

    def __init__(self, config: MlflowIntegration, spec: JobSpec, job_id: str,
                 settings: Settings, on_warning: Callable[[dict[str, Any]], None]) -> None:
        self.config, self.spec, self.job_id = config, spec, job_id
        self.settings, self.on_warning = settings, on_warning
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.held = 0
        self.dropped = 0
        self.failed = False
        self.run_id: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"mlflow-{job_id}", daemon=True)
        self.thread.start()

    # the training thread's side: never blocks

    def on_metrics(self, rows: Sequence[MetricRow]) -> None:
        if self.failed:
            return
        batch = [(row.step, scalars(row)) for row in rows]
        self.held += len(batch)
        if self.held > MLFLOW_QUEUE_ROWS:
            self.dropped += len(batch)
            self.held -= len(batch)
            return
        self.queue.put(("metrics", batch))

    def on_checkpoint(self) -> None:
        pass

    def finish(self, status: JobStatus | None, best: Callable[[], Path | None]) -> None:
        """Send what is held, the best checkpoint and the run's end (``status`` None: the
        attempt was interrupted and the job resumes later; the run stays open)."""
        self.queue.put(("finish", (status, best)))
        self.queue.put(("stop", None))

    def wait(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return not self.thread.is_alive()

    # the MLflow thread

    def _fail(self, message: str) -> None:
        if not self.failed:
            self.failed = True
            self.on_warning(warning(self.kind, message))
            log.warning("job %s: mlflow integration off: %s", self.job_id, message)

    def _connect(self) -> Any:
        uri = self.config.tracking_uri
        allowed = any(uri == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/")
                      for p in self.settings.mlflow_tracking_uri_list)
        if not allowed:
            resolve_public(uri, allow_private=False)  # OutboundRefused: not this server
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", MLFLOW_TIMEOUT_S)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = self.config.experiment_name or "lmforge"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(name)
            except Exception:  # made meanwhile by another job
                again = client.get_experiment_by_name(name)
                if again is None:
                    raise
                experiment_id = again.experiment_id
        found = client.search_runs([experiment_id],
                                   filter_string=f"tags.`lmforge.job_id` = '{self.job_id}'",
                                   max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            run = client.create_run(experiment_id,
                                    run_name=self.config.run_name or self.spec.name
                                    or self.job_id,
                                    tags={"lmforge.job_id": self.job_id,
                                          "lmforge.task": self.spec.task})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            spec = self.spec.model_dump(mode="json", exclude={"notify", "integrations"})
            params = [Param(k, v) for k, v in sorted(flatten(spec).items())]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i:i + 100])
        return client

    def _run(self) -> None:
        client: Any = None
        try:
            client = self._connect()
        except OutboundRefused as exc:
            self._fail(f"the tracking_uri was refused: {exc}")
        except ImportError:
            self._fail("the mlflow package is not installed on this worker "
                       "(pip install 'lmforge[integrations]')")
        except Exception as exc:
            self._fail(f"could not reach the tracking server ({type(exc).__name__}: "
                       f"{str(exc)[:300]})")
        while True:
            what, data = self.queue.get()
            if what == "stop":
                return
            if self.failed:
                continue
            try:
                if what == "metrics":
                    self._log_metrics(client, data)
                elif what == "finish":
                    self._finish(client, *data)
            except Exception as exc:
                self._fail(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")

    def _log_metrics(self, client: Any, batch: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        self.held -= len(batch)
        now_ms = int(time.time() * 1000)
        metrics = [Metric(name, value, now_ms, step) for step, values in batch
                   for name, value in values.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _finish(self, client: Any, status: JobStatus | None,
                best: Callable[[], Path | None]) -> None:
        if self.dropped:
            self.on_warning(warning(self.kind, f"{self.dropped} metric rows were not sent "
                                               "(the tracking server was too slow)"))
        if status is None:
            return
        path = best()
        if path is not None:
            client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
        client.set_terminated(self.run_id, _MLFLOW_RUN_STATUS.get(status, "FINISHED"))


# -- the runner's side ------------------------------------------------------------------------


class Integrations:
    """The integrations of one attempt. Every method catches its sinks' errors: an
    integration never fails a job."""

    def __init__(self, spec: JobSpec, job_id: str, storage: Storage, settings: Settings,
                 factory: sessionmaker[Session]) -> None:
        self.job_id, self.storage, self.factory = job_id, storage, factory
        self.warnings: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"lmforge-{job_id}-"))
        self.sinks: list[Any] = []
        for integration in spec.integrations:
            try:
                if isinstance(integration, TensorBoardIntegration):
                    self.sinks.append(TensorBoardSink(job_id, storage, self._workdir))
                elif isinstance(integration, MlflowIntegration):
                    self.sinks.append(MlflowSink(integration, spec, job_id, settings,
                                                 self._warn))
            except Exception as exc:
                self._warn(warning(integration.kind, f"{type(exc).__name__}: {exc}"))

    def _warn(self, w: dict[str, Any]) -> None:
        with self._lock:
            self.warnings.append(w)

    def _call(self, sink: Any, method: str, *args: Any) -> None:
        if getattr(sink, "off", False):
            return
        try:
            getattr(sink, method)(*args)
        except ImportError as exc:
            sink.off = True
            self._warn(warning(sink.kind, f"the {sink.kind} package is not installed on this "
                                          f"worker ({exc}; pip install 'lmforge[integrations]')"))
        except Exception as exc:
            sink.off = True
            log.warning("job %s: %s integration off", self.job_id, sink.kind, exc_info=True)
            self._warn(warning(sink.kind, f"{type(exc).__name__}: {str(exc)[:300]}"))

    def on_metrics(self, rows: Sequence[MetricRow]) -> None:
        for sink in self.sinks:
            self._call(sink, "on_metrics", rows)

    def on_checkpoint(self) -> None:
        for sink in self.sinks:
            self._call(sink, "on_checkpoint")

    def _best_checkpoint(self) -> Path | None:
        """The job's best checkpoint (else its last) copied to a file named after it."""
        with session_scope(self.factory) as s:
            row = s.execute(
                select(Checkpoint.kind, Checkpoint.step, Checkpoint.storage_key)
                .where(Checkpoint.job_id == self.job_id,
                       Checkpoint.kind.in_([CheckpointKind.BEST, CheckpointKind.LAST]))
                .order_by(Checkpoint.kind, Checkpoint.step.desc())
            ).all()
        if not row:
            return None
        best = [r for r in row if r[0] == CheckpointKind.BEST] or row
        kind, step, key = best[0]
        path = self._workdir / f"{CheckpointKind(kind).value}-step{step}.safetensors"
        with self.storage.open(key) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return path

    def finish(self, status: JobStatus | None, keep_alive: Callable[[], None],
               timeout_s: float = MLFLOW_FINISH_S, interval_s: float = 5.0
               ) -> list[dict[str, Any]]:
        """End every integration (``status`` None: interrupted, to be resumed), waiting for
        the MLflow thread at most ``timeout_s`` seconds while ``keep_alive`` (the job's
        heartbeat) runs every ``interval_s``. Returns the warnings of the attempt."""
        for sink in self.sinks:
            self._call(sink, "finish", status, self._best_checkpoint)
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            if not isinstance(sink, MlflowSink):
                continue
            while not sink.wait(min(interval_s, max(deadline - time.monotonic(), 0.0))):
                if time.monotonic() >= deadline:
                    sink.failed = True
                    self._warn(warning(sink.kind, f"the tracking server had not taken the "
                                                  f"run's data after {timeout_s:g} s"))
                    break
                try:
                    keep_alive()
                except Exception:  # the lease is the heartbeat's business
                    log.debug("keep-alive failed", exc_info=True)
        shutil.rmtree(self._workdir, ignore_errors=True)
        with self._lock:
            return list(self.warnings)
