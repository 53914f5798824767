from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from store.db import session_scope
from store.progress import claim_job
from tests.api.conftest import RecordingEnqueuer, small_spec, upload


def _create(client: TestClient, spec: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=spec)


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


def test_create_job_is_201_with_location_defaults_filled_and_enqueued_after_commit(
    client: TestClient, dataset_id: str, enqueuer: RecordingEnqueuer
) -> None:
    r = _create(client, {"dataset_id": dataset_id})
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job_") and job["status"] == "queued"
    assert job["spec"]["training"]["batch_size"] == 32
    assert job["spec"]["model"]["hidden_dim"] == 256
    assert job["spec"]["dataset"] == {"id": dataset_id, "builtin": None, "path": None}
    assert job["progress"] == {"step": 0, "total_steps": 1000, "tokens_seen": 0,
                               "eta_s": None, "queue_position": 1}
    assert job["error"] is None and job["started_at"] is None
    assert enqueuer.sent == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_create_job_on_the_builtin_corpus(client: TestClient) -> None:
    r = _create(client, {"dataset": {"builtin": "python-docs"}, "tokenizer": {"kind": "word"}})
    assert r.status_code == 201, r.text


def test_malformed_spec_is_422_naming_the_field(client: TestClient, dataset_id: str) -> None:
    err = _error(_create(client, small_spec(dataset_id, batch_size=0)), 422)
    assert err["code"] == "validation_error"
    assert err["field"] == "training.batch_size"


def test_unknown_key_is_422_naming_it(client: TestClient, dataset_id: str) -> None:
    spec = small_spec(dataset_id)
    spec["model"]["hiden_dim"] = 3
    assert _error(_create(client, spec), 422)["field"] == "model.hiden_dim"


def test_unknown_dataset_is_422_naming_dataset_id(client: TestClient) -> None:
    err = _error(_create(client, {"dataset_id": "ds_missing"}), 422)
    assert err["field"] == "dataset_id"
    assert "ds_missing" in err["message"]


def test_unknown_validation_dataset_is_422_naming_validation_id(
    client: TestClient, dataset_id: str
) -> None:
    spec = {"dataset_id": dataset_id, "validation": {"id": "ds_missing"}}
    assert _error(_create(client, spec), 422)["field"] == "validation.id"


def test_unknown_tokenizer_kind_is_422_naming_tokenizer_kind(
    client: TestClient, dataset_id: str
) -> None:
    spec = {"dataset_id": dataset_id, "tokenizer": {"kind": "sentencepiece"}}
    assert _error(_create(client, spec), 422)["field"] == "tokenizer.kind"


def test_tie_weights_with_unequal_dims_is_422_naming_model_tie_weights(
    client: TestClient, dataset_id: str
) -> None:
    spec = {"dataset_id": dataset_id,
            "model": {"tie_weights": True, "embed_dim": 64, "hidden_dim": 128}}
    err = _error(_create(client, spec), 422)
    assert err["field"] == "model.tie_weights"
    assert "embed_dim=64" in err["message"]


def test_path_source_is_refused_over_http(client: TestClient) -> None:
    err = _error(_create(client, {"dataset": {"path": "/etc/passwd"}}), 422)
    assert err["field"] == "dataset.path"


def test_too_small_corpus_is_422_with_the_numbers(client: TestClient) -> None:
    ds = upload(client, "a" * 1000).json()["id"]
    err = _error(_create(client, {"dataset_id": ds}), 422)
    assert err["code"] == "corpus_too_small"
    # char tokens: floor(1000 * 0.9) = 900 < 32 x 65 = 2080
    assert err["details"] == [{"split": "train", "tokens": 900, "needed": 2080,
                               "batch_size": 32, "seq_len": 64}]
    assert "900" in err["message"] and "2080" in err["message"]


def test_word_corpus_size_counts_one_eos_per_line(client: TestClient) -> None:
    ds = upload(client, "a b c\n" * 100).json()["id"]  # 300 words + 100 <eos> = 400 tokens
    spec = {"dataset_id": ds, "tokenizer": {"kind": "word"},
            "training": {"batch_size": 4, "seq_len": 89}}  # needs 360 = floor(400 * 0.9)
    assert _create(client, spec).status_code == 201
    spec["training"]["seq_len"] = 90  # needs 364 > 360
    assert _error(_create(client, spec), 422)["details"][0]["tokens"] == 360


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/metrics", "/v1/jobs/job_nope/result",
                 "/v1/jobs/job_nope/checkpoints"):
        assert _error(client.get(path), 404)["code"] == "not_found"
    assert _error(client.post("/v1/jobs/job_nope/cancel"), 404)["code"] == "not_found"


def test_unknown_route_is_404_in_the_error_shape(client: TestClient) -> None:
    assert _error(client.get("/v1/nothing-here"), 404) == {
        "code": "not_found", "message": "Not Found", "field": None, "details": []}


def test_list_jobs_newest_first_with_cursor(client: TestClient, dataset_id: str) -> None:
    ids = [_create(client, small_spec(dataset_id)).json()["id"] for _ in range(5)]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == [ids[4], ids[3]]
    assert first["has_more"] is True
    second = client.get("/v1/jobs", params={"limit": 2, "after": first["next_after"]}).json()
    assert [j["id"] for j in second["data"]] == [ids[2], ids[1]]
    third = client.get("/v1/jobs", params={"limit": 2, "after": second["next_after"]}).json()
    assert [j["id"] for j in third["data"]] == [ids[0]]
    assert third["has_more"] is False and third["next_after"] is None


def test_list_jobs_with_an_unknown_cursor_is_422(client: TestClient) -> None:
    assert _error(client.get("/v1/jobs", params={"after": "job_x"}), 422)["field"] == "after"


def test_cancel_of_queued_job_cancels_it_at_once(client: TestClient, dataset_id: str) -> None:
    job = _create(client, small_spec(dataset_id)).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    result = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert result["status"] == "cancelled" and result["stop_reason"] == "cancelled"


def test_cancel_of_finished_job_is_409(client: TestClient, dataset_id: str) -> None:
    job = _create(client, small_spec(dataset_id)).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    err = _error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert err["code"] == "job_finished"


def test_cancel_of_running_job_sets_the_flag_and_keeps_it_running(
    client: TestClient, dataset_id: str, session_factory: sessionmaker[Session]
) -> None:
    job_id = _create(client, small_spec(dataset_id)).json()["id"]
    with session_scope(session_factory) as s:
        assert claim_job(s, job_id, "w1") is not None
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202
    assert (r.json()["status"], r.json()["cancel_requested"]) == ("running", True)


def test_result_is_409_until_the_job_finishes(client: TestClient, dataset_id: str) -> None:
    job_id = _create(client, small_spec(dataset_id)).json()["id"]
    assert _error(client.get(f"/v1/jobs/{job_id}/result"), 409)["code"] == "job_not_finished"


def test_a_broker_that_refuses_leaves_the_job_queued_with_no_enqueued_at_and_answers_201(
    client: TestClient, dataset_id: str, enqueuer: RecordingEnqueuer
) -> None:
    enqueuer.fail = ConnectionError("Connection refused")
    r = _create(client, small_spec(dataset_id))
    assert r.status_code == 201, r.text
    job = r.json()
    assert (job["status"], job["enqueued_at"], job["error"]) == ("queued", None, None)
    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    assert enqueuer.sent == []


def test_a_successful_enqueue_records_enqueued_at(
    client: TestClient, dataset_id: str, enqueuer: RecordingEnqueuer
) -> None:
    from datetime import datetime

    r = _create(client, small_spec(dataset_id))
    job = r.json()
    assert enqueuer.sent == [job["id"]]
    assert datetime.fromisoformat(job["enqueued_at"]) >= datetime.fromisoformat(job["created_at"])
    assert client.get(f"/v1/jobs/{job['id']}").json()["enqueued_at"] == job["enqueued_at"]


def test_healthz_reports_database_and_broker_and_is_503_when_degraded(
    client: TestClient, enqueuer: RecordingEnqueuer
) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "database": True,
                                               "broker": True})
    enqueuer.fail = ConnectionError()
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (503, {"status": "degraded", "database": True,
                                               "broker": False})
    assert int(r.headers["retry-after"]) > 0


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": "x"}])
def test_bad_query_parameter_is_422_naming_it(client: TestClient, params: dict[str, Any]) -> None:
    assert _error(client.get("/v1/jobs", params=params), 422)["field"] == "limit"


def test_unhandled_error_is_500_in_the_error_shape(
    client: TestClient, dataset_id: str, enqueuer: RecordingEnqueuer
) -> None:
    from app.deps import get_session

    def broken() -> None:
        raise RuntimeError("boom")

    client.app.dependency_overrides[get_session] = broken  # type: ignore[attr-defined]
    r = client.get("/v1/jobs")
    rid = r.headers["x-request-id"]
    assert _error(r, 500) == {
        "code": "internal_error", "field": None, "details": [], "request_id": rid,
        "message": "internal server error; it has been logged: quote the request id "
                   f"{rid} when reporting it"}
    assert "boom" not in r.text
