"""Request errors a person can act on: the field named when there is one, never a character
offset or pydantic's internal wording."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def _error(r: Any) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


def test_invalid_json_body_names_no_field_and_says_where_it_broke(client: TestClient) -> None:
    r = client.post("/v1/jobs", content=b'{"name": "x", ',
                    headers={"Content-Type": "application/json"})
    err = _error(r)
    assert err["field"] is None
    assert err["message"].startswith("the request body is not valid JSON (")
    assert "at character 14" in err["message"]


def test_spec_without_data_names_dataset_id(client: TestClient) -> None:
    err = _error(client.post("/v1/jobs", json={}))
    assert err["field"] == "dataset_id"
    assert err["message"] == "dataset_id: dataset_id (or dataset) is required: a job needs data"


def test_conflicting_dataset_id_and_dataset_names_dataset_id(client: TestClient) -> None:
    err = _error(client.post("/v1/jobs", json={"dataset_id": "ds_a", "dataset": {"id": "ds_b"}}))
    assert err["field"] == "dataset_id"
    assert "Value error" not in err["message"]


def test_zero_val_fraction_without_validation_names_val_fraction(client: TestClient) -> None:
    err = _error(client.post("/v1/jobs", json={"dataset": {"builtin": "python-docs"},
                                               "val_fraction": 0.0}))
    assert err["field"] == "val_fraction"


def test_missing_body_says_a_json_body_is_required(client: TestClient) -> None:
    err = _error(client.post("/v1/jobs"))
    assert err["field"] is None
    assert err["message"] == "a JSON request body is required"


def test_body_sent_as_form_data_says_to_send_json(client: TestClient) -> None:
    err = _error(client.post("/v1/jobs", content=b"dataset_id=ds_x",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}))
    assert "Content-Type: application/json" in err["message"]
