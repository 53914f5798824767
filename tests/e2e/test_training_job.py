"""A 200-step character job on real text, over HTTP, through Redis and a real Celery worker,
on SQLite and on PostgreSQL: metrics, result, checkpoints, download, and sampling."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

STEPS = 200


@pytest.fixture(scope="session")
def trained(api: Any) -> dict[str, Any]:
    """The finished 200-step job, its metrics and its checkpoints (one run per backend)."""
    job = api.submit(name="e2e-char-200")
    finished = api.wait_finished(job["id"])
    assert finished["status"] == "succeeded", finished
    return {
        "job": finished,
        "metrics": api.metrics(job["id"]),
        "checkpoints": api.checkpoints(job["id"]),
    }


def test_job_succeeds_with_its_spec_defaults_filled_in(trained: dict[str, Any]) -> None:
    job = trained["job"]
    assert job["error"] is None
    assert job["progress"]["step"] == STEPS
    assert job["progress"]["total_steps"] == STEPS
    assert job["spec"]["training"]["max_steps"] == STEPS
    assert job["spec"]["optimizer"]["name"] == "adam"  # defaults filled in
    assert job["spec"]["optimizer"]["lr"] == 0.001
    assert job["spec"]["val_fraction"] == 0.1
    assert job["started_at"] is not None and job["finished_at"] is not None


def test_metric_rows_cover_every_step_exactly_once(trained: dict[str, Any]) -> None:
    steps = [row["step"] for row in trained["metrics"]]
    assert steps == list(range(1, STEPS + 1))
    for row in trained["metrics"]:
        assert row["train_loss"] > 0
        assert row["tokens_per_s"] > 0


def test_validation_loss_falls(trained: dict[str, Any]) -> None:
    val = [row for row in trained["metrics"] if row["val_loss"] is not None]
    assert [row["step"] for row in val][-1] == STEPS
    assert len(val) >= 2
    assert val[-1]["val_loss"] < val[0]["val_loss"]


def test_result_names_the_best_checkpoint(service: Any, trained: dict[str, Any]) -> None:
    job_id = trained["job"]["id"]
    response = service.client.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["steps"] == STEPS
    best = [c for c in trained["checkpoints"] if c["kind"] == "best"]
    assert [result["best_checkpoint_id"]] == [c["id"] for c in best]
    val_losses = [r["val_loss"] for r in trained["metrics"] if r["val_loss"] is not None]
    assert result["best_val_loss"] == pytest.approx(min(val_losses))
    assert result["final_val_loss"] == pytest.approx(val_losses[-1])


def test_checkpoints_are_best_and_last(trained: dict[str, Any]) -> None:
    kinds = sorted(c["kind"] for c in trained["checkpoints"])
    assert kinds == ["best", "last"]
    last = next(c for c in trained["checkpoints"] if c["kind"] == "last")
    assert last["step"] == STEPS


def test_best_checkpoint_download_matches_its_sha256(service: Any, trained: dict[str, Any]) -> None:
    best = next(c for c in trained["checkpoints"] if c["kind"] == "best")
    job_id = trained["job"]["id"]
    response = service.client.get(f"/v1/jobs/{job_id}/checkpoints/{best['id']}/download")
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    assert response.headers["X-Checkpoint-SHA256"] == digest == best["sha256"]
    assert len(response.content) == best["bytes"]


def test_downloaded_checkpoint_loads_with_safetensors_and_samples_text(
    service: Any, trained: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors import safe_open

    from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from worker.engine.sample import sample

    best = next(c for c in trained["checkpoints"] if c["kind"] == "best")
    job_id = trained["job"]["id"]
    data = service.client.get(f"/v1/jobs/{job_id}/checkpoints/{best['id']}/download").content
    path = tmp_path / "best.safetensors"
    path.write_bytes(data)

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        weight_names = {k for k in f.keys() if k.startswith("model.")}
    assert metadata["format"] == "lmforge.checkpoint.v1"
    ckpt = load_checkpoint(data)
    model = build_model_from_checkpoint(ckpt)
    assert {f"model.{k}" for k in model.state_dict()} == weight_names
    assert ckpt.model_config.hidden_dim == 64

    text = sample(data, prompt="A", max_new_tokens=100, temperature=0.8, seed=0)
    assert text.startswith("A")
    assert len(text) == 101  # one character per token
    assert sample(data, prompt="A", max_new_tokens=100, temperature=0.8, seed=0) == text


def test_worker_parent_process_never_loads_torch(service: Any, trained: dict[str, Any]) -> None:
    """Torch belongs in the forked pool process only (docs/operations.md): check the parent's
    memory map after it has run a job."""
    pid = service.procs["worker"].pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps
