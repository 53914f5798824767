"""Each concept is defined once: the API's metric and result models are derived from the engine
contract, the database stores metrics by name, and a job kind's own metrics need no migration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import inspect

from app.schemas import JobResultOut, MetricOut
from core.classification import ClassificationResult
from core.contract import CheckpointBlob, CheckpointKind, StepMetrics, TrainingResult
from core.ppo import PPOResult
from store import models
from store.db import session_scope
from store.models import JobStatus
from store.progress import claim_job, record_metrics

from .conftest import small_spec


def _names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_metric_response_fields_are_the_step_metrics_fields() -> None:
    assert set(MetricOut.model_fields) == _names(StepMetrics)


def test_result_response_has_every_training_result_field_and_the_service_fields() -> None:
    service = {"job_id", "status", "best_checkpoint_id", "last_checkpoint_id", "error"}
    assert set(JobResultOut.model_fields) == (_names(TrainingResult)
                                              | _names(ClassificationResult)
                                              | _names(PPOResult) | service)


def test_metric_table_stores_values_by_name_not_one_column_per_metric() -> None:
    columns = {c.name for c in inspect(models.Metric).columns}
    assert columns == {"job_id", "step", "values"}


def test_checkpoint_kind_is_one_enum_shared_by_engine_and_database() -> None:
    assert models.CheckpointKind is CheckpointKind
    column = inspect(models.Checkpoint).columns["kind"]
    assert column.type.enum_class is CheckpointKind  # type: ignore[attr-defined]
    kinds: set[str] = {k.value for k in CheckpointKind}
    assert kinds == {"best", "last", "periodic"}
    assert dataclasses.fields(CheckpointBlob)[0].name == "kind"


@dataclass
class ClassifierStep:
    """A metric row of another job kind, with names the schema has never heard of."""

    step: int
    train_loss: float
    val_macro_f1: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def test_a_job_kind_reports_its_own_metrics_without_a_migration(
    client: TestClient, dataset_id: str
) -> None:
    job_id = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with session_scope(factory) as s:
        job = claim_job(s, job_id, "test-worker")
        assert job is not None and job.status == JobStatus.RUNNING
        record_metrics(s, job_id, job.attempts,
                       [ClassifierStep(1, 0.69), ClassifierStep(2, 0.5, val_macro_f1=0.75)])
    rows = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [(r["step"], r["train_loss"], r["val_macro_f1"]) for r in rows] == [
        (1, 0.69, None), (2, 0.5, 0.75)]
    latest = client.get(f"/v1/jobs/{job_id}").json()["latest_metrics"]
    assert (latest["val_step"], latest["val_macro_f1"]) == (2, 0.75)
