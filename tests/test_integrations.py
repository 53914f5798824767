"""Per-job integrations (issue 13), against the real libraries: TensorBoard's own
``EventAccumulator`` reads the event files the worker wrote, and a real ``mlflow server``
process (started here on a free port, its store under tmp_path) receives the run.

Jobs run through :func:`worker.runner.run_job` on a real database and storage
(``tests.support.jobenv``), as a worker runs them."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.contract import StepMetrics
from core.spec import JobSpec
from lmforge.processes import free_port, kill_process_group, spawn, terminate
from store.db import session_scope
from store.integrations import tensorboard_key
from store.models import Checkpoint, CheckpointKind, Job, JobStatus, Metric
from tests.support.jobenv import OWNER, Env, make_env
from worker.integrations import TensorBoardSink

MLFLOW_START_S = 240.0  # a cold start (database migrations) on a busy 2-core machine


def _submit(env: Env, integrations: list[dict[str, Any]], **training: Any) -> str:
    from app.jobs import create_job

    spec = JobSpec.model_validate({
        "name": "integrations",
        "dataset_id": env.dataset_id,
        "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
        "training": {"batch_size": 4, "seq_len": 16, "max_steps": 12, "eval_interval": 6,
                     "log_interval": 4, "num_threads": 1, **training},
        "integrations": integrations,
    })
    with session_scope(env.factory) as s:
        return create_job(s, OWNER, spec, settings=env.settings).id


def _rows(env: Env, job_id: str) -> dict[int, dict[str, Any]]:
    with session_scope(env.factory) as s:
        return {m.step: dict(m.values) for m in
                s.scalars(select(Metric).where(Metric.job_id == job_id))}


def _accumulator(archive: bytes, into: Path) -> EventAccumulator:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(into, filter="data")
    (folder,) = list(into.iterdir())
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


# -- TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_files_hold_every_metric_row_readable_by_tensorboard(
    tmp_path: Path,
) -> None:
    env = make_env(tmp_path)
    job_id = _submit(env, [{"kind": "tensorboard"}])
    assert env.run(job_id) == JobStatus.SUCCEEDED
    result = env.job(job_id).result or {}
    assert [w for w in result.get("warnings", []) if w["code"] == "integration_failed"] == []
    acc = _accumulator(env.storage.read_bytes(tensorboard_key(job_id)), tmp_path / "tb")
    rows = _rows(env, job_id)
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"} <= tags
    train = acc.Scalars("train_loss")
    assert [e.step for e in train] == list(range(1, 13))
    assert [e.value for e in train] == pytest.approx([rows[n]["train_loss"] for n in range(1, 13)],
                                                     rel=1e-6)
    assert [e.step for e in acc.Scalars("val_loss")] == [6, 12]
    assert [e.value for e in acc.Scalars("val_loss")] == pytest.approx(
        [rows[6]["val_loss"], rows[12]["val_loss"]], rel=1e-6)


def test_a_resumed_attempt_replaces_the_replayed_steps_in_tensorboard(tmp_path: Path) -> None:
    """Attempt 1 wrote steps 1-10; attempt 2 resumes from a checkpoint at step 5 and writes
    5-12 again (other values): TensorBoard shows each step once, the later attempt's from 5."""
    env = make_env(tmp_path)
    job_id = "job_" + "c" * 32

    def row(step: int, loss: float) -> StepMetrics:
        return StepMetrics(step=step, epoch=0.0, train_loss=loss, lr=1e-3, grad_norm=1.0,
                           tokens_per_s=100.0, elapsed_s=float(step), tokens_seen=step)

    first = TensorBoardSink(job_id, env.storage, tmp_path / "w1")
    first.on_metrics([row(n, 10.0 + n) for n in range(1, 11)])
    first.finish(None, lambda: None)
    second = TensorBoardSink(job_id, env.storage, tmp_path / "w2")
    second.on_metrics([row(n, 100.0 + n) for n in range(5, 13)])
    second.finish(None, lambda: None)
    acc = _accumulator(env.storage.read_bytes(tensorboard_key(job_id)), tmp_path / "tb")
    events = acc.Scalars("train_loss")
    assert [e.step for e in events] == list(range(1, 13))
    assert [e.value for e in events] == [11, 12, 13, 14, *[100.0 + n for n in range(5, 13)]]


def test_the_api_serves_the_tensorboard_archive(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.api.conftest import authorize

    env = make_env(tmp_path)
    job_id = _submit(env, [{"kind": "tensorboard"}], max_steps=4, eval_interval=4)
    assert env.run(job_id) == JobStatus.SUCCEEDED
    with TestClient(create_app(env.settings)) as c:
        authorize(c, "root", admin=True)
        r = c.get(f"/v1/jobs/{job_id}/tensorboard.tar.gz")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/gzip"
        assert r.content == env.storage.read_bytes(tensorboard_key(job_id))
        other = _submit(env, [], max_steps=4)
        assert c.get(f"/v1/jobs/{other}/tensorboard.tar.gz").status_code == 404


# -- MLflow -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
            str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts")]
    with open(log_path, "ab") as log:
        proc = spawn(argv, log=log)
    try:
        deadline = time.monotonic() + MLFLOW_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        terminate(proc, timeout=20)
        kill_process_group(proc)


def test_mlflow_gets_the_params_metrics_and_best_checkpoint(
    tmp_path: Path, mlflow_server: str,
) -> None:
    from mlflow.tracking import MlflowClient

    env = make_env(tmp_path, LMFORGE_MLFLOW_TRACKING_URIS=mlflow_server)
    job_id = _submit(env, [{"kind": "mlflow", "tracking_uri": mlflow_server,
                            "experiment_name": "lmforge-tests"}, {"kind": "tensorboard"}])
    assert env.run(job_id) == JobStatus.SUCCEEDED
    result = env.job(job_id).result or {}
    assert [w for w in result.get("warnings", []) if w["code"] == "integration_failed"] == []

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("lmforge-tests")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id],
                                filter_string=f"tags.`lmforge.job_id` = '{job_id}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "integrations"
    params = run.data.params
    assert (params["model.hidden_dim"], params["training.max_steps"],
            params["tokenizer.kind"]) == ("32", "12", "char")
    assert not any(k.startswith(("notify", "integrations")) for k in params)
    rows = _rows(env, job_id)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    assert {m.step: m.value for m in history} == pytest.approx(
        {n: rows[n]["train_loss"] for n in range(1, 13)}, rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id,
                                                            "val_loss")) == [6, 12]
    # The best checkpoint, byte for byte.
    with session_scope(env.factory) as s:
        best = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                  Checkpoint.kind == CheckpointKind.BEST)
                         ).one()
        best_key, best_step = best.storage_key, best.step
    (artifact,) = client.list_artifacts(run.info.run_id, "checkpoints")
    assert artifact.path == f"checkpoints/best-step{best_step}.safetensors"
    local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path / "dl"))
    assert Path(local).read_bytes() == env.storage.read_bytes(best_key)


def test_an_unreachable_tracking_server_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = make_env(tmp_path, LMFORGE_MLFLOW_TRACKING_URIS=nowhere)
    job_id = _submit(env, [{"kind": "mlflow", "tracking_uri": nowhere}], max_steps=4,
                     eval_interval=4)
    assert env.run(job_id) == JobStatus.SUCCEEDED
    job = env.job(job_id)
    assert job.status == JobStatus.SUCCEEDED
    warnings = [w for w in (job.result or {}).get("warnings", [])
                if w["code"] == "integration_failed"]
    assert len(warnings) == 1 and warnings[0]["integration"] == "mlflow"
    assert "tracking server" in warnings[0]["message"]


def test_a_private_tracking_uri_not_allowed_by_the_deployment_is_refused_by_the_worker(
    tmp_path: Path,
) -> None:
    """A spec stored before the deployment's allow-list changed: the worker checks again."""
    pytest.importorskip("mlflow")
    env = make_env(tmp_path, LMFORGE_MLFLOW_TRACKING_URIS="http://127.0.0.1:1")
    job_id = _submit(env, [{"kind": "mlflow", "tracking_uri": "http://127.0.0.1:1"}],
                     max_steps=4, eval_interval=4)
    env.settings = env.settings.model_copy(update={"mlflow_tracking_uris": ""})
    assert env.run(job_id) == JobStatus.SUCCEEDED
    (w,) = [w for w in (env.job(job_id).result or {}).get("warnings", [])
            if w["code"] == "integration_failed"]
    assert "refused" in w["message"] and "loopback" in w["message"]


def test_integration_modules_do_not_load_mlflow_or_tensorboard_until_used() -> None:
    code = ("import sys, worker.runner, worker.integrations; "
            "print(sorted({'mlflow', 'tensorboard', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_job_row_unchanged_by_integrations_fields(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    job_id = _submit(env, [{"kind": "tensorboard"}], max_steps=2, eval_interval=2)
    with session_scope(env.factory) as s:
        spec = s.get_one(Job, job_id).spec
    assert spec["integrations"] == [{"kind": "tensorboard"}] and spec["notify"] is None
