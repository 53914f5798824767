"""Client errors from the real service: 422 naming the bad field, 404 for unknown ids, all in
the one JSON error shape."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

UNKNOWN_JOB = "job_" + "0" * 32


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "field", "details"} <= set(body["error"])
    return dict(body["error"])


def _job_count(api: Any) -> int:
    return len(api.client.get("/v1/jobs", params={"limit": 500}).json()["data"])


def test_malformed_json_is_422(api: Any) -> None:
    before = _job_count(api)
    response = api.client.post(
        "/v1/jobs", content=b'{"name": "x", ', headers={"Content-Type": "application/json"}
    )
    error = _error(response, 422)
    assert error["code"] == "validation_error"
    assert _job_count(api) == before


def test_wrongly_typed_field_is_422_naming_it(api: Any) -> None:
    error = _error(api.client.post("/v1/jobs", json=api.spec(training={"batch_size": "many"})), 422)
    assert error["field"] == "training.batch_size"


def test_unknown_field_is_422_naming_it(api: Any) -> None:
    error = _error(api.client.post("/v1/jobs", json=api.spec(model={"hiden_dim": 8})), 422)
    assert error["field"] == "model.hiden_dim"


def test_unknown_dataset_is_422(api: Any) -> None:
    spec = api.spec()
    spec.pop("dataset", None)
    spec["dataset_id"] = "ds_" + "0" * 32
    before = _job_count(api)
    error = _error(api.client.post("/v1/jobs", json=spec), 422)
    assert error["field"] == "dataset_id"
    assert "ds_" + "0" * 32 in error["message"]
    assert _job_count(api) == before


def test_unknown_tokenizer_kind_is_422(api: Any) -> None:
    error = _error(api.client.post("/v1/jobs", json=api.spec(tokenizer={"kind": "morse"})), 422)
    assert error["field"] == "tokenizer.kind"


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", f"/v1/jobs/{UNKNOWN_JOB}"),
        ("GET", f"/v1/jobs/{UNKNOWN_JOB}/metrics"),
        ("GET", f"/v1/jobs/{UNKNOWN_JOB}/result"),
        ("GET", f"/v1/jobs/{UNKNOWN_JOB}/checkpoints"),
        ("POST", f"/v1/jobs/{UNKNOWN_JOB}/cancel"),
        ("GET", f"/v1/datasets/ds_{'0' * 32}"),
    ],
)
def test_unknown_id_is_404(api: Any, method: str, path: str) -> None:
    error = _error(api.client.request(method, path), 404)
    assert error["code"] == "not_found"
