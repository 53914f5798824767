"""``POST /v1/jobs?dry_run=true`` (app.estimate): the estimate of a submission, reserving
nothing. A real app on a real SQLite file; no inference server here (its address is a closed
port), so ``seconds_per_step`` is null with a warning (tests/e2e/test_export_dry_run.py
calibrates through a real ``lmforge serve``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.deps import get_enqueuer
from app.main import create_app
from core.estimate import param_count, train_memory, train_memory_bytes, vocab_bound
from core.spec import JobSpec
from core.textstats import TextStats
from lmforge.processes import free_port
from store.models import IdempotencyKey, Job
from store.settings import Settings
from tests.api.conftest import RecordingEnqueuer, authorize, small_spec, upload


@contextmanager
def service(tmp_path: Path, **env: Any) -> Iterator[tuple[TestClient, RecordingEnqueuer]]:
    """A client of an API configured with ``env`` whose inference server is not running."""
    settings = Settings(LMFORGE_HOME=tmp_path / "home",
                        DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
                        LMFORGE_INFERENCE_URL=f"http://127.0.0.1:{free_port()}", **env)
    enqueuer = RecordingEnqueuer()
    app = create_app(settings)
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c, f"user-{uuid.uuid4().hex[:8]}")
        yield c, enqueuer


def _exact(client: TestClient, dataset_id: str) -> dict[str, Any]:
    """The dataset's per-tokenizer statistics (its exact vocabularies, core.datasetstats)."""
    stats: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()["stats"]
    return stats


def _count(client: TestClient, model: Any) -> int:
    with client.app.state.session_factory() as s:  # type: ignore[attr-defined]
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _stats(client: TestClient, dataset_id: str) -> TextStats:
    d = client.get(f"/v1/datasets/{dataset_id}").json()
    return TextStats(d["num_chars"], d["num_lines"], d["num_words"], d["bytes"])


def test_a_dry_run_answers_the_estimate_and_reserves_nothing(tmp_path: Path) -> None:
    with service(tmp_path, LMFORGE_QUOTA_QUEUED_JOBS=1) as (c, enqueuer):
        ds = upload(c).json()["id"]
        spec = small_spec(ds)
        for _ in range(3):  # more dry runs than the queued-jobs quota allows submissions
            r = c.post("/v1/jobs?dry_run=true", json=spec, headers={"Idempotency-Key": "k1"})
            assert r.status_code == 200, r.text
            assert "location" not in r.headers
        assert _count(c, Job) == 0 and _count(c, IdempotencyKey) == 0
        assert enqueuer.sent == [] and c.get("/v1/jobs").json()["data"] == []
        # The quota is untouched and the key unused: a real submission with that key and
        # another spec creates its job (a remembered key would make it a 409).
        other = {**spec, "name": "another"}
        r = c.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k1"})
        assert r.status_code == 201, r.text
        assert enqueuer.sent == [r.json()["id"]] and _count(c, Job) == 1
        # Now at the quota: a dry run still answers, and says a submission would be refused.
        est = c.post("/v1/jobs?dry_run=true", json=spec).json()
        assert any("429 quota_exceeded" in w for w in est["warnings"])
        assert c.post("/v1/jobs", json=spec).status_code == 429
        assert _count(c, Job) == 1


def test_the_numbers_are_those_of_core_estimate(tmp_path: Path) -> None:
    with service(tmp_path) as (c, _):
        ds = upload(c).json()["id"]
        body = small_spec(ds, device="cpu", precision="bf16")
        body["tokenizer"] = {"kind": "word"}
        est = c.post("/v1/jobs?dry_run=true", json=body).json()
        spec = JobSpec.model_validate(body)
        assert est["spec"] == spec.model_dump(mode="json")  # every default filled in
        assert est["spec"]["optimizer"]["name"] == "adam" and est["dry_run"] is True
        bound = vocab_bound(spec, _stats(c, ds), _exact(c, ds))
        assert est["vocab_size"] == {"size": bound.size, "why": bound.why}
        assert est["parameters"] == param_count(spec, bound.size)
        parts = train_memory(spec, bound.size)
        mem = est["memory"]
        assert (mem["weights_bytes"], mem["gradients_bytes"], mem["optimizer_state_bytes"],
                mem["activations_bytes"]) == (parts.weights, parts.gradients,
                                              parts.optimizer_state, parts.activations)
        assert mem["optimizer_state_bytes"] == 2 * mem["weights_bytes"]  # Adam: 2 moments
        assert mem["total_bytes"] == parts.total == train_memory_bytes(spec, bound.size)
        assert (mem["batch_size"], mem["seq_len"], mem["precision"]) == (4, 8, "bf16")
        assert mem["device_class"] == "cpu" and mem["fits"] is True
        assert mem["limit_bytes"] == Settings().max_train_memory_bytes_cpu
        assert est["max_parameters"] == Settings().max_params
        assert est["max_steps"] == 5
        # No inference server: no time, and a warning that says why.
        assert est["seconds_per_step"] is None and est["calibration"] is None
        assert est["estimated_train_seconds"] is None
        assert any("inference_unavailable" in w for w in est["warnings"])


def test_a_job_too_large_is_the_same_422_with_the_numbers_at_dry_run_and_submission(
        tmp_path: Path) -> None:
    with service(tmp_path, LMFORGE_MAX_TRAIN_MEMORY_BYTES_CPU=100_000) as (c, _):
        ds = upload(c).json()["id"]
        big = small_spec(ds, batch_size=16, seq_len=32, device="cpu")
        dry = c.post("/v1/jobs?dry_run=true", json=big)
        real = c.post("/v1/jobs", json=big)
        assert dry.status_code == real.status_code == 422
        d_err, r_err = dry.json()["error"], real.json()["error"]
        assert d_err == r_err and d_err["code"] == "job_too_large"
        numbers = d_err["details"][0]
        assert numbers["max_train_memory_bytes"] == 100_000
        assert numbers["train_memory_bytes"] > 100_000
        spec = JobSpec.model_validate(big)
        bound = vocab_bound(spec, _stats(c, ds), _exact(c, ds))
        assert numbers["train_memory_bytes"] == train_memory_bytes(spec, bound.size)
        assert numbers["vocab_size_bound"] == bound.size
        # The message shows them: the estimate (bytes and GiB), the limit, the batch shape.
        msg = d_err["message"]
        assert f"{numbers['train_memory_bytes']:,} bytes" in msg
        assert "16 x 32" in msg and "0.00 GiB" in msg
        assert _count(c, Job) == 0


def test_a_dry_run_checks_the_spec_as_a_submission_does(tmp_path: Path) -> None:
    with service(tmp_path) as (c, _):
        r = c.post("/v1/jobs?dry_run=true", json=small_spec("ds_" + "0" * 32))
        assert r.status_code == 422 and r.json()["error"]["field"] == "dataset_id"
        ds = upload(c, "tiny\n").json()["id"]
        r = c.post("/v1/jobs?dry_run=true", json=small_spec(ds))
        assert r.status_code == 422 and r.json()["error"]["code"] == "corpus_too_small"
        r = c.post("/v1/jobs?dry_run=maybe", json=small_spec(ds))
        assert r.status_code == 422 and r.json()["error"]["field"] == "dry_run"
