"""Metrics, checkpoints and results as the runner's helpers write them and the API reads them."""

from __future__ import annotations

import base64
import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.contract import CheckpointBlob, StepMetrics
from core.contract import CheckpointKind as K
from core.errors import Conflict
from store.db import session_scope
from store.models import Job, JobStatus
from store.progress import (
    JobLost,
    claim_job,
    finish_job,
    prepare_resume,
    record_checkpoint,
    record_metrics,
)
from store.storage import LocalStorage
from tests.api.conftest import small_spec

Factory = sessionmaker[Session]


def _row(step: int, val: float | None = None) -> StepMetrics:
    return StepMetrics(step=step, epoch=step / 10, train_loss=3.0 - step / 100, lr=1e-3,
                       grad_norm=1.0, tokens_per_s=100.0, elapsed_s=step * 0.1,
                       tokens_seen=step * 36, val_loss=val, val_ppl=None if val is None else 9.0)


@pytest.fixture
def running(client: TestClient, dataset_id: str, session_factory: Factory) -> str:
    job_id = str(client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"])
    with session_scope(session_factory) as s:
        assert claim_job(s, job_id, "w1") is not None
    return job_id


def test_metrics_are_paged_in_step_order(
    client: TestClient, running: str, session_factory: Factory
) -> None:
    with session_scope(session_factory) as s:
        record_metrics(s, running, 1, [_row(i, 2.5 if i == 3 else None) for i in (1, 2, 3, 4)])
    page = client.get(f"/v1/jobs/{running}/metrics", params={"limit": 3}).json()
    assert [m["step"] for m in page["data"]] == [1, 2, 3] and page["has_more"] is True
    assert page["data"][2]["val_loss"] == 2.5 and page["data"][0]["val_loss"] is None
    rest = client.get(f"/v1/jobs/{running}/metrics", params={"after_step": 3}).json()
    assert [m["step"] for m in rest["data"]] == [4] and rest["has_more"] is False
    job = client.get(f"/v1/jobs/{running}").json()
    # eta_s: 1 step left at 10 steps/s (steps 1-4 over elapsed_s 0.1-0.4: app.metricseries)
    assert job["progress"] == {"step": 4, "total_steps": 5, "tokens_seen": 144,
                               "eta_s": 0.1, "queue_position": None}
    assert job["latest_metrics"]["step"] == 4
    assert (job["latest_metrics"]["val_step"], job["latest_metrics"]["val_loss"]) == (3, 2.5)


def test_checkpoint_download_streams_the_blob_with_its_sha256(
    client: TestClient, running: str, session_factory: Factory
) -> None:
    data = b"\x00safetensors-bytes" * 1000
    storage = client.app.state.storage  # type: ignore[attr-defined]
    with session_scope(session_factory) as s:
        row, _ = record_checkpoint(s, storage, running, 1,
                                   CheckpointBlob(K.BEST, 3, data, {"val_loss": 2.5}), 3)
    listed = client.get(f"/v1/jobs/{running}/checkpoints").json()["data"]
    sha = hashlib.sha256(data).hexdigest()
    assert [(c["id"], c["kind"], c["step"], c["bytes"], c["sha256"]) for c in listed] == [
        (row.id, "best", 3, len(data), sha)]
    r = client.get(f"/v1/jobs/{running}/checkpoints/{row.id}/download")
    assert r.status_code == 200 and r.content == data
    assert r.headers["x-checkpoint-sha256"] == sha
    assert r.headers["etag"] == f'"{sha}"'
    assert r.headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    name = f"{running}-best-step3.safetensors"
    assert r.headers["content-disposition"] == (
        f'attachment; filename="{name}"; filename*=UTF-8\'\'{name}')


def test_unknown_checkpoint_is_404(client: TestClient, running: str) -> None:
    r = client.get(f"/v1/jobs/{running}/checkpoints/ckpt_nope/download")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_best_and_last_replace_their_predecessors_and_periodic_keeps_n(
    running: str, session_factory: Factory, tmp_path: object, client: TestClient
) -> None:
    storage: LocalStorage = client.app.state.storage  # type: ignore[attr-defined]
    stale_keys: list[str] = []
    with session_scope(session_factory) as s:
        for step in (1, 2, 3, 4):
            for kind in ("best", "last", "periodic"):
                _, stale = record_checkpoint(s, storage, running, 1,
                                             CheckpointBlob(K(kind), step, b"x%d" % step), 2)
                stale_keys += stale
    for key in stale_keys:
        storage.delete(key)
    ckpts = client.get(f"/v1/jobs/{running}/checkpoints").json()["data"]
    assert sorted((c["kind"], c["step"]) for c in ckpts) == [
        ("best", 4), ("last", 4), ("periodic", 3), ("periodic", 4)]
    blobs = list((storage.root / "checkpoints" / running).iterdir())
    assert len(blobs) == 4


def test_result_of_a_succeeded_job_names_the_best_checkpoint(
    client: TestClient, running: str, session_factory: Factory
) -> None:
    storage = client.app.state.storage  # type: ignore[attr-defined]
    with session_scope(session_factory) as s:
        best, _ = record_checkpoint(s, storage, running, 1, CheckpointBlob(K.BEST, 2, b"b"), 3)
        finish_job(s, running, 1, JobStatus.SUCCEEDED,
                   result={"steps": 5, "best_val_loss": 2.0, "best_val_ppl": 7.39,
                           "stop_reason": "max_steps", "tokens_seen": 180, "duration_s": 1.5})
    r = client.get(f"/v1/jobs/{running}/result").json()
    assert (r["status"], r["best_checkpoint_id"], r["steps"], r["stop_reason"]) == (
        "succeeded", best.id, 5, "max_steps")


def test_writes_of_a_superseded_attempt_are_refused(
    running: str, session_factory: Factory
) -> None:
    with session_scope(session_factory) as s:
        s.get_one(Job, running).attempts = 2  # as if the sweep handed it to another worker
    with pytest.raises(JobLost), session_scope(session_factory) as s:
        record_metrics(s, running, 1, [_row(1)])
    with pytest.raises(JobLost), session_scope(session_factory) as s:
        finish_job(s, running, 1, JobStatus.SUCCEEDED)


def test_resume_cuts_metrics_after_the_checkpoint_and_skips_a_corrupt_one(
    client: TestClient, running: str, session_factory: Factory
) -> None:
    storage: LocalStorage = client.app.state.storage  # type: ignore[attr-defined]
    with session_scope(session_factory) as s:
        record_metrics(s, running, 1, [_row(i) for i in range(1, 9)])
        record_checkpoint(s, storage, running, 1, CheckpointBlob(K.PERIODIC, 4, b"four"), 3)
        bad, _ = record_checkpoint(s, storage, running, 1, CheckpointBlob(K.LAST, 6, b"six"), 3)
    storage.path(bad.storage_key).write_bytes(b"tampered")
    with session_scope(session_factory) as s:
        data, stale = prepare_resume(s, storage, running)
    assert data == b"four" and stale == [bad.storage_key]
    steps = [m["step"] for m in client.get(f"/v1/jobs/{running}/metrics").json()["data"]]
    assert steps == [1, 2, 3, 4]
    kinds = [c["kind"] for c in client.get(f"/v1/jobs/{running}/checkpoints").json()["data"]]
    assert kinds == ["periodic"]


def test_second_claim_of_the_same_job_returns_none(
    running: str, session_factory: Factory
) -> None:
    with session_scope(session_factory) as s:
        assert claim_job(s, running, "w2") is None
        assert s.get_one(Job, running).worker_id == "w1"


def test_illegal_transition_is_a_conflict(running: str, session_factory: Factory) -> None:
    from store.status import transition

    with session_scope(session_factory) as s:
        transition(s, running, JobStatus.SUCCEEDED)
    with pytest.raises(Conflict), session_scope(session_factory) as s:
        transition(s, running, JobStatus.RUNNING)


def test_a_checkpoint_damaged_in_storage_is_never_offered_for_download(
    client: TestClient, running: str, session_factory: Factory
) -> None:
    storage = client.app.state.storage  # type: ignore[attr-defined]
    with session_scope(session_factory) as s:
        row, _ = record_checkpoint(s, storage, running, 1,
                                   CheckpointBlob(K.BEST, 3, b"good bytes" * 100, {}), 3)
    storage.path(row.storage_key).write_bytes(b"bad bytes" * 100)
    r = client.get(f"/v1/jobs/{running}/checkpoints/{row.id}/download")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "checkpoint_corrupt"
