"""Hostile input (issue 12): every request a client can make is answered with a 4xx naming what
is wrong, never a 500, on SQLite and on PostgreSQL; nothing is stored from a refused request;
no answer or job error carries server internals; storage paths never come from user input.

Real app, real databases (a SQLite file in tmp and an embedded PostgreSQL), real storage; only
the broker is the recording fake of ``tests/api/conftest.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.deps import get_enqueuer
from app.main import create_app
from app.middleware import accepted_request_id
from app.routes.files import content_disposition
from store.settings import Settings
from store.storage import LocalStorage
from tests.api.conftest import RecordingEnqueuer, authorize, small_spec, upload
from worker.runner import internal_message

NUL = "\x00"


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()["error"]
    return body


def _client(settings: Settings, enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    app = create_app(settings)
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c)
        yield c


@pytest.fixture(params=["sqlite", "postgres"])
def any_client(request: pytest.FixtureRequest, tmp_path: Path,
               enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    """The API on SQLite, then on PostgreSQL (which refuses NUL in text and integers past
    2^31-1 in ``integer`` columns: each must be a 422 before the database sees it)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'api.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    settings = Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=url,
                        LMFORGE_MAX_UPLOAD_BYTES=64 * 1024, LMFORGE_RATE_LIMIT_PER_MINUTE=0)
    yield from _client(settings, enqueuer)


def _stored_files(client: TestClient) -> list[str]:
    root: Path = client.app.state.storage.root  # type: ignore[attr-defined]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _post_raw_json(client: TestClient, text: str) -> Any:
    return client.post("/v1/jobs", content=text.encode(),
                       headers={"Content-Type": "application/json"})


# -- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "key", "literal", "field"), [
    ("optimizer", "lr", "NaN", "optimizer.lr"),
    ("model", "dropout", "Infinity", "model.dropout"),
    ("training", "max_runtime_s", "-Infinity", "training.max_runtime_s"),
    ("schedule", "gamma", "1e309", "schedule.gamma"),  # parses to inf
    ("training", "seed", "1e309", "training.seed"),
    ("optimizer", "betas", "[NaN, 0.9]", "optimizer.betas.0"),
])
def test_non_finite_numbers_are_422_naming_the_field(
    client: TestClient, dataset_id: str, section: str, key: str, literal: str, field: str
) -> None:
    spec = small_spec(dataset_id)
    spec.setdefault(section, {})[key] = "@@"
    text = json.dumps(spec).replace('"@@"', literal)
    err = _error(_post_raw_json(client, text), 422)
    assert err["field"] == field
    assert client.get("/v1/jobs").json()["data"] == []


@pytest.mark.parametrize(("section", "value", "field"), [
    ({"training": {"device": "meta"}}, "meta", "training.device"),
    ({"training": {"device": "cuda:x"}}, "cuda:x", "training.device"),
    ({"training": {"device": "CPU"}}, "CPU", "training.device"),
    ({"training": {"device": "cpu; rm -rf /"}}, "cpu; rm -rf /", "training.device"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, 1.0, "optimizer.betas.1"),
    ({"optimizer": {"betas": [-0.1, 0.9]}}, -0.1, "optimizer.betas.0"),
])
def test_values_that_cannot_run_are_422_at_submission(
    client: TestClient, dataset_id: str, section: dict[str, dict[str, Any]], value: Any,
    field: str,
) -> None:
    spec = small_spec(dataset_id)
    for part, values in section.items():
        spec[part] = {**spec.get(part, {}), **values}
    assert _error(client.post("/v1/jobs", json=spec), 422)["field"] == field


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_runnable_devices_are_accepted(client: TestClient, dataset_id: str, device: str) -> None:
    r = client.post("/v1/jobs", json=small_spec(dataset_id, device=device))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["training"]["device"] == device


# -- text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("patch", "field"), [
    ({"name": f"a{NUL}b"}, "name"),
    ({"name": "\x1b[2J\x1b[31mred"}, "name"),
    ({"name": "line\nforged log line"}, "name"),
    ({"dataset_id": f"ds_{NUL}"}, "dataset_id"),
    ({"validation": {"id": f"ds_{NUL}x"}}, "validation.id"),
])
def test_control_characters_in_spec_text_are_422_on_every_backend(
    any_client: TestClient, patch: dict[str, Any], field: str
) -> None:
    ds = upload(any_client).json()["id"]
    spec = {**small_spec(ds), **patch}
    assert _error(any_client.post("/v1/jobs", json=spec), 422)["field"] == field
    assert any_client.get("/v1/jobs").json()["data"] == []


def _multipart(filename: str, name: str | None, body: bytes = b"some text\n") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand, so that any bytes reach the server."""
    b = "hostileboundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
             f"Content-Type: text/plain\r\n\r\n".encode() + body + b"\r\n"]
    if name is not None:
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'
                     f"{name}\r\n".encode())
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


@pytest.mark.parametrize(("filename", "name", "field"), [
    ("corpus.txt", f"my{NUL}data", "name"),
    ("corpus.txt", "bell\x07", "name"),
    ("corpus.txt", "x" * 201, "name"),
    (f"a{NUL}.txt", None, "file"),
    ("evil\x1b]0;title\x07.txt", "fine", "file"),
])
def test_control_characters_in_upload_names_are_422_and_nothing_is_stored(
    any_client: TestClient, filename: str, name: str | None, field: str
) -> None:
    body, ctype = _multipart(filename, name)
    r = any_client.post("/v1/datasets", content=body, headers={"Content-Type": ctype})
    assert _error(r, 422)["field"] == field
    assert any_client.get("/v1/datasets").json()["data"] == []
    assert _stored_files(any_client) == []


def test_a_malformed_multipart_body_is_422_not_500(client: TestClient) -> None:
    # The body schemathesis found (issue 12): a part with no headers.
    r = client.post("/v1/datasets", content=b"--B\r\n[{}, [], 897]--B--\r\n",
                    headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert _error(r, 422)["code"] == "malformed_body"
    assert _stored_files(client) == []


def test_a_truncated_multipart_body_stores_nothing(client: TestClient) -> None:
    # Found by a new-user run: a body cut off before its closing boundary was stored.
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'
    r = client.post("/v1/datasets", content=body,
                    headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert _error(r, 422)["code"] == "malformed_body"
    assert _stored_files(client) == []
    assert client.get("/v1/datasets").json()["data"] == []


@pytest.mark.parametrize("path", [
    f"/v1/jobs/job_{NUL}x", f"/v1/jobs/a{NUL}/metrics", f"/v1/datasets/ds{NUL}",
    f"/v1/jobs/job_1/checkpoints/ck{NUL}/download",
])
def test_control_characters_in_path_ids_are_422_on_every_backend(
    any_client: TestClient, path: str
) -> None:
    err = _error(any_client.get(path.replace(NUL, "%00")), 422)
    assert err["field"] in ("job_id", "dataset_id", "checkpoint_id")


# -- query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "status", "field"), [
    ({"after": ""}, 422, "after"),
    ({"after": f"job_{NUL}"}, 422, "after"),
    ({"after": "x" * 10_000}, 422, "after"),
    ({"after": "job_" + "0" * 32}, 404, "after"),  # well formed, names no job
    ({"limit": 2**63}, 422, "limit"),
    ({"limit": -1}, 422, "limit"),
])
def test_list_parameters_out_of_range_are_4xx_on_every_backend(
    any_client: TestClient, params: dict[str, Any], status: int, field: str
) -> None:
    for route in ("/v1/jobs", "/v1/datasets"):
        query = {k: (v.replace("job_", "ds_") if route == "/v1/datasets" and isinstance(v, str)
                     else v) for k, v in params.items()}
        assert _error(any_client.get(route, params=query), status)["field"] == field


@pytest.mark.parametrize("after_step", [2**31, 2**63, 10**30, -1])
def test_after_step_past_the_storable_range_is_422_on_every_backend(
    any_client: TestClient, after_step: int
) -> None:
    ds = upload(any_client).json()["id"]
    job = any_client.post("/v1/jobs", json=small_spec(ds)).json()["id"]
    r = any_client.get(f"/v1/jobs/{job}/metrics", params={"after_step": after_step})
    assert _error(r, 422)["field"] == "after_step"
    ok = any_client.get(f"/v1/jobs/{job}/metrics", params={"after_step": 2**31 - 1})
    assert ok.status_code == 200 and ok.json()["data"] == []


# -- storage paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["../../../../etc/passwd", "/etc/passwd", "..", ".bashrc",
                                      "C:\\Windows\\win.ini", "a/b/c.txt"])
def test_upload_file_names_never_become_storage_paths(
    client: TestClient, tmp_path: Path, filename: str
) -> None:
    body, ctype = _multipart(filename, None)
    r = client.post("/v1/datasets", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 201, r.text
    ds = r.json()
    # Recorded as given (it is the default name; python-multipart keeps only the last part of
    # a Windows path, as browsers of old sent them) ...
    assert ds["name"] == filename.rsplit("\\", 1)[-1]
    assert _stored_files(client) == [f"datasets/{ds['id']}.txt"]  # ... but never a path
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", f"a{NUL}b", ".hidden",
                                 "datasets/.x", "a//b", "a\\b", "", "a\nb", "datasets/x y"])
def test_storage_refuses_keys_outside_its_shape(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "storage")
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.path(key)
    with pytest.raises(ValueError):
        storage.put_bytes(key, b"x")
    assert not any(tmp_path.rglob("x"))


def test_storage_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    storage.put_bytes("datasets/ok.txt", b"fine")
    (tmp_path / "outside").mkdir()
    (storage.root / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside the storage root"):
        storage.put_bytes("escape/pwned.txt", b"x")
    assert list((tmp_path / "outside").iterdir()) == []
    assert storage.read_bytes("datasets/ok.txt") == b"fine"


@pytest.mark.parametrize(("filename", "expected"), [
    ("job_1-best-step3.safetensors",
     "attachment; filename=\"job_1-best-step3.safetensors\"; "
     "filename*=UTF-8''job_1-best-step3.safetensors"),
    ('a"b\r\nSet-Cookie: x=1.txt',
     "attachment; filename=\"a_b__Set-Cookie__x_1.txt\"; "
     "filename*=UTF-8''a%22b%0D%0ASet-Cookie%3A%20x%3D1.txt"),
    ("../../.ssh/id_rsa", "attachment; filename=\"_.._.ssh_id_rsa\"; "
                          "filename*=UTF-8''_.._.ssh_id_rsa"),
    ("résumé.txt", "attachment; filename=\"r_sum_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"),
])
def test_content_disposition_is_safe(filename: str, expected: str) -> None:
    assert content_disposition(filename) == expected


# -- what answers and errors reveal -----------------------------------------------------------


def test_a_500_reveals_nothing_but_the_request_id_which_the_log_carries(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    from app.deps import get_session

    def broken() -> None:
        raise RuntimeError("password=hunter2 at /srv/lmforge/secret.py, SELECT * FROM api_keys, "
                           "10.0.0.5:5432")

    client.app.dependency_overrides[get_session] = broken  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="app.http_errors"):
        r = client.get("/v1/jobs", headers={"X-Request-ID": "client-chosen-id-1"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "client-chosen-id-1"
    assert r.json()["error"]["request_id"] == "client-chosen-id-1"
    for secret in ("hunter2", "/srv", "SELECT", "10.0.0.5", "Traceback", "RuntimeError"):
        assert secret not in r.text
    (record,) = [rec for rec in caplog.records if rec.name == "app.http_errors"]
    assert record.request_id == "client-chosen-id-1"  # type: ignore[attr-defined]
    assert record.getMessage().startswith("[request client-chosen-id-1] unhandled error")
    assert record.exc_info is not None  # the traceback is in the log, not the answer


def test_every_answer_carries_a_request_id(client: TestClient) -> None:
    a, b = client.get("/v1/jobs"), client.get("/v1/jobs/job_nope")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    assert len(a.headers["x-request-id"]) == 32
    assert client.get("/healthz").headers["x-request-id"]
    mine = client.get("/v1/jobs", headers={"X-Request-ID": "trace:abc-123.4_5"})
    assert mine.headers["x-request-id"] == "trace:abc-123.4_5"


@pytest.mark.parametrize("sent", ["", "x" * 129, "has space", "new\nline", "é", "a;b"])
def test_an_insane_client_request_id_is_replaced(sent: str) -> None:
    got = accepted_request_id(sent)
    assert got != sent and len(got) == 32


def test_a_job_error_never_carries_the_exception_text() -> None:
    exc = ConnectionError("Error 111 connecting to redis.internal:6379. Connection refused.")
    message = internal_message(exc)
    assert "ConnectionError" in message
    assert "redis.internal" not in message and "6379" not in message


# -- cross-site requests ----------------------------------------------------------------------


def test_cors_is_off_by_default(client: TestClient) -> None:
    pre = client.options("/v1/jobs", headers={"Origin": "https://evil.example",
                                              "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    get = client.get("/v1/jobs", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in get.headers


def test_cors_allows_only_the_configured_origins(tmp_path: Path,
                                                 enqueuer: RecordingEnqueuer) -> None:
    settings = Settings(LMFORGE_HOME=tmp_path / "home",
                        DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
                        LMFORGE_CORS_ORIGINS="https://ui.example, https://b.example")
    for client in _client(settings, enqueuer):
        ask = {"Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        ok = client.options("/v1/jobs", headers={"Origin": "https://ui.example", **ask})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        assert "access-control-allow-credentials" not in ok.headers
        bad = client.options("/v1/jobs", headers={"Origin": "https://evil.example", **ask})
        assert bad.status_code == 400
        assert "access-control-allow-origin" not in bad.headers
        got = client.get("/v1/jobs", headers={"Origin": "https://b.example"})
        assert got.status_code == 200
        assert got.headers["access-control-allow-origin"] == "https://b.example"
        assert "x-request-id" in got.headers["access-control-expose-headers"].lower()


def test_a_cross_site_form_post_to_cancel_is_refused(client: TestClient, dataset_id: str) -> None:
    job = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    # A browser submitting a form from another site: no Authorization header (the API uses no
    # cookies, and a form cannot set headers), a form body, an Origin.
    browser = TestClient(client.app, raise_server_exceptions=False)
    r = browser.post(f"/v1/jobs/{job}/cancel", data={"confirm": "yes"},
                     headers={"Origin": "https://evil.example"})
    assert _error(r, 401)["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get(f"/v1/jobs/{job}").json()["status"] == "queued"


# -- the OpenAPI document ---------------------------------------------------------------------


def test_the_openapi_document_gives_the_real_error_shape(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in item.items():
            codes = {"401", "422", "429", "503"}
            codes |= {"404"} if "{" in path else set()
            codes |= {"400", "413"} if "requestBody" in op else set()
            for code in codes:
                assert op["responses"][code]["content"]["application/json"]["schema"] == ref, (
                    method, path, code)
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error"]


def test_a_405_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.request("DELETE", "/v1/jobs")
    assert _error(r, 405)["code"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, POST"
    dl = client.request("PUT", "/v1/jobs/job_1/checkpoints/ckpt_1/download")
    assert dl.headers["allow"] == "GET, HEAD"
