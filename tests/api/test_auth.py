"""API keys and ownership (issue 12: OWASP API1, API2, API3, API5), against the real app on a
real SQLite file with real keys.

- Every route of the OpenAPI schema (except ``/healthz``) answers 401 with
  ``WWW-Authenticate: Bearer`` without a key, with a malformed or unknown one, and with a
  revoked one.
- Principal B's key gets 404 for every route that names one of principal A's datasets, jobs,
  metrics, results, checkpoints or downloads (table-driven; the table must cover every route
  of the schema), never sees them in lists or through a cursor, cannot cancel them, and cannot
  use A's datasets in a job spec (422 "does not exist"). An admin sees everything.
- Keys are stored only as sha256 hashes (the database rows are inspected);
  ``lmforge keys create`` prints the key as its only line on stdout; non-admin keys cannot
  use ``/v1/keys`` (403).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from core.contract import CheckpointBlob, CheckpointKind, StepMetrics
from store.db import session_scope
from store.progress import claim_job, record_checkpoint, record_metrics
from store.settings import Settings
from tests.api.conftest import CORPUS, bearer, small_spec, upload

KEY_RE = re.compile(r"^lmf_[A-Za-z0-9]{40}$")


@dataclass
class World:
    """Principal A (``client``'s key, ``tester``) owns a dataset and a running job with
    metrics and a checkpoint; ``b`` and ``admin`` are other keys of the same database."""

    client: TestClient
    a: str
    b: str
    admin: str
    dataset_id: str
    job_id: str
    checkpoint_id: str


@pytest.fixture
def world(client: TestClient, make_key: Callable[..., str],
          session_factory: sessionmaker[Session]) -> World:
    ds = upload(client).json()["id"]
    job_id = client.post("/v1/jobs", json=small_spec(ds)).json()["id"]
    storage = client.app.state.storage  # type: ignore[attr-defined]
    with session_scope(session_factory) as s:
        job = claim_job(s, job_id, "w1")
        assert job is not None
        record_metrics(s, job_id, job.attempts, [StepMetrics(1, 0.1, 2.0, 1e-3, 0.5, 10.0,
                                                             0.1, 100)])
        ckpt, _ = record_checkpoint(s, storage, job_id, job.attempts,
                                    CheckpointBlob(CheckpointKind.LAST, 1, b"w" * 64, {}), 3)
        ckpt_id = ckpt.id
    a = client.headers["Authorization"].removeprefix("Bearer ")
    return World(client, a, make_key("bob"), make_key("root", admin=True), ds, job_id, ckpt_id)


def _upload_as(c: TestClient, key: str) -> str:
    r = c.post("/v1/datasets", files={"file": ("c.txt", CORPUS.encode(), "text/plain")},
               headers=bearer(key))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _schema_routes(client: TestClient) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in client.app.openapi()["paths"].items()  # type: ignore[attr-defined]
            for m in ops if p != "/healthz"}


def _requests(w: World) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(method, route template, path, request kwargs): one request per route of the API,
    naming principal A's resources where the route names one."""
    j = f"/v1/jobs/{w.job_id}"
    dl = f"{j}/checkpoints/{w.checkpoint_id}/download"
    files = {"file": ("c.txt", CORPUS.encode(), "text/plain")}
    return [
        ("POST", "/v1/datasets", "/v1/datasets", {"files": files}),
        ("GET", "/v1/datasets", "/v1/datasets", {}),
        ("GET", "/v1/datasets/{dataset_id}", f"/v1/datasets/{w.dataset_id}", {}),
        ("DELETE", "/v1/datasets/{dataset_id}", f"/v1/datasets/{w.dataset_id}", {}),
        ("POST", "/v1/jobs", "/v1/jobs", {"json": small_spec(w.dataset_id)}),
        ("GET", "/v1/jobs", "/v1/jobs", {}),
        ("GET", "/v1/jobs/{job_id}", j, {}),
        ("POST", "/v1/jobs/{job_id}/cancel", f"{j}/cancel", {}),
        ("GET", "/v1/jobs/{job_id}/metrics", f"{j}/metrics", {}),
        ("GET", "/v1/jobs/{job_id}/metrics.csv", f"{j}/metrics.csv", {}),
        ("GET", "/v1/jobs/{job_id}/events", f"{j}/events", {}),
        ("GET", "/v1/jobs/{job_id}/samples", f"{j}/samples", {}),
        ("GET", "/v1/jobs/{job_id}/result", f"{j}/result", {}),
        ("GET", "/v1/jobs/{job_id}/webhooks", f"{j}/webhooks", {}),
        ("GET", "/v1/jobs/{job_id}/tensorboard.tar.gz", f"{j}/tensorboard.tar.gz", {}),
        ("GET", "/v1/jobs/{job_id}/checkpoints", f"{j}/checkpoints", {}),
        ("GET", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/download", dl, {}),
        ("HEAD", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/download", dl, {}),
        ("GET", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/export",
         dl.removesuffix("download") + "export", {}),
        ("POST", "/v1/jobs/{job_id}/generate", f"{j}/generate", {"json": {"checkpoint": "last"}}),
        ("POST", "/v1/jobs/{job_id}/score", f"{j}/score", {"json": {"text": "ab"}}),
        ("POST", "/v1/jobs/{job_id}/classify", f"{j}/classify", {"json": {"texts": ["ab"]}}),
        ("POST", "/v1/keys", "/v1/keys", {"json": {"name": "mallory"}}),
        ("GET", "/v1/keys", "/v1/keys", {}),
        ("DELETE", "/v1/keys/{prefix}", f"/v1/keys/{w.a[:12]}", {}),
    ]


def test_the_tables_cover_every_route_of_the_schema(world: World) -> None:
    assert {(m, t) for m, t, _, _ in _requests(world)} == _schema_routes(world.client)
    assert {(m, t) for m, t, _ in _CROSS_PRINCIPAL} == _schema_routes(world.client)


# -- 401 --------------------------------------------------------------------------------------


def _assert_401(r: Any, where: Any) -> None:
    assert r.status_code == 401, (where, r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer"), where
    if r.request.method != "HEAD":
        assert r.json()["error"]["code"] == "unauthorized", where


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Basic dGVzdDp0ZXN0", "Bearer not-a-key",
    "Bearer lmf_" + "A" * 40,  # well formed, unknown
    "bearer lmf_" + "A" * 40,
], ids=["none", "empty", "no-credentials", "blank", "basic", "malformed", "unknown",
        "lowercase-scheme"])
def test_every_route_refuses_a_missing_or_invalid_key_with_401(
    world: World, authorization: str | None
) -> None:
    c = world.client
    for method, _, path, kwargs in _requests(world):
        headers = {} if authorization is None else {"Authorization": authorization}
        c.headers.pop("Authorization", None)
        r = c.request(method, path, headers=headers, **kwargs)
        _assert_401(r, (method, path))
    # Nothing was done on the way: A's job still runs, no dataset or key was added.
    c.headers.update(bearer(world.a))
    assert c.get(f"/v1/jobs/{world.job_id}").json()["status"] == "running"
    assert len(c.get("/v1/datasets").json()["data"]) == 1


def test_a_revoked_key_is_refused_with_401_on_every_route(world: World) -> None:
    c = world.client
    admin = bearer(world.admin)
    revoked = c.delete(f"/v1/keys/{world.b[:12]}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    for method, _, path, kwargs in _requests(world):
        _assert_401(c.request(method, path, headers=bearer(world.b), **kwargs), (method, path))
    # Revoking again keeps the first time; other keys still work.
    again = c.delete(f"/v1/keys/{world.b[:12]}", headers=admin)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert c.get("/v1/jobs").status_code == 200


def test_health_and_the_api_docs_need_no_key(client: TestClient) -> None:
    client.headers.pop("Authorization")
    for path in ("/healthz", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# -- ownership --------------------------------------------------------------------------------

# What principal B gets on each route when the request names principal A's resource (or, for
# the routes that name none, what B sees or creates). ``check`` looks at the answer.
_CROSS_PRINCIPAL: list[tuple[str, str, int]] = [
    ("POST", "/v1/datasets", 201),  # B's own dataset (checked below: A does not see it)
    ("GET", "/v1/datasets", 200),  # without A's dataset
    ("GET", "/v1/datasets/{dataset_id}", 404),
    ("DELETE", "/v1/datasets/{dataset_id}", 404),
    ("POST", "/v1/jobs", 422),  # A's dataset "does not exist" for B
    ("GET", "/v1/jobs", 200),  # without A's job
    ("GET", "/v1/jobs/{job_id}", 404),
    ("POST", "/v1/jobs/{job_id}/cancel", 404),
    ("GET", "/v1/jobs/{job_id}/metrics", 404),
    ("GET", "/v1/jobs/{job_id}/metrics.csv", 404),
    ("GET", "/v1/jobs/{job_id}/events", 404),
    ("GET", "/v1/jobs/{job_id}/samples", 404),
    ("GET", "/v1/jobs/{job_id}/result", 404),
    ("GET", "/v1/jobs/{job_id}/webhooks", 404),
    ("GET", "/v1/jobs/{job_id}/tensorboard.tar.gz", 404),
    ("GET", "/v1/jobs/{job_id}/checkpoints", 404),
    ("GET", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/download", 404),
    ("HEAD", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/download", 404),
    ("GET", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/export", 404),
    ("POST", "/v1/jobs/{job_id}/generate", 404),
    ("POST", "/v1/jobs/{job_id}/score", 404),
    ("POST", "/v1/jobs/{job_id}/classify", 404),
    ("POST", "/v1/keys", 403),  # key management is for admin keys
    ("GET", "/v1/keys", 403),
    ("DELETE", "/v1/keys/{prefix}", 403),
]


def test_another_principal_gets_404_for_every_route_naming_a_resource_it_does_not_own(
    world: World,
) -> None:
    c = world.client
    expected = {(m, t): status for m, t, status in _CROSS_PRINCIPAL}
    for method, template, path, kwargs in _requests(world):
        r = c.request(method, path, headers=bearer(world.b), **kwargs)
        assert r.status_code == expected[(method, template)], (method, path, r.text)
        if r.status_code == 404 and method != "HEAD":
            # The same answer as for an id that does not exist: nothing tells B it exists.
            assert r.json()["error"]["code"] == "not_found"
            missing = c.request(method, path.replace(world.job_id, "job_" + "0" * 32)
                                .replace(world.dataset_id, "ds_" + "0" * 32),
                                headers=bearer(world.b), **kwargs)
            assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
        if method == "GET" and template in ("/v1/jobs", "/v1/datasets"):
            listed = {x["id"] for x in r.json()["data"]}
            assert not listed & {world.job_id, world.dataset_id}, r.json()
        if (method, template) == ("POST", "/v1/jobs"):
            err = r.json()["error"]
            assert (err["field"], "does not exist" in err["message"]) == ("dataset_id", True)
        if r.status_code == 403:
            assert r.json()["error"]["code"] == "forbidden"
    # A's job was not cancelled and A's key was not revoked; A does not see B's dataset.
    a_job = c.get(f"/v1/jobs/{world.job_id}").json()
    assert (a_job["status"], a_job["cancel_requested"]) == ("running", False)
    assert [d["id"] for d in c.get("/v1/datasets").json()["data"]] == [world.dataset_id]


def test_a_cursor_naming_another_principals_resource_is_an_unknown_cursor(world: World) -> None:
    c = world.client
    for path, cursor in (("/v1/jobs", world.job_id), ("/v1/datasets", world.dataset_id)):
        r = c.get(path, params={"after": cursor}, headers=bearer(world.b))
        unknown = c.get(path, params={"after": cursor[:-4] + "0000"}, headers=bearer(world.b))
        assert r.status_code == unknown.status_code >= 400, r.text
        assert r.json()["error"]["code"] == unknown.json()["error"]["code"]
        assert r.json()["error"]["field"] == "after"
        # A's own key pages past it.
        assert c.get(path, params={"after": cursor}).status_code == 200


def test_a_spec_cannot_use_another_principals_dataset_anywhere(world: World) -> None:
    c, b = world.client, bearer(world.b)
    own = _upload_as(c, world.b)  # B's own corpus
    other = world.dataset_id
    for field, spec in (
        ("validation.id", {**small_spec(own), "validation": {"id": other}}),
        ("test.id", {**small_spec(own), "test": {"id": other}}),
        ("dataset.id", {**{k: v for k, v in small_spec(own).items() if k != "dataset_id"},
                        "dataset": {"id": other}}),
    ):
        r = c.post("/v1/jobs", json=spec, headers=b)
        assert r.status_code == 422, (field, r.text)
        # (the spec model folds "dataset": {"id"} into dataset_id)
        assert r.json()["error"]["field"] in (field, field.replace(".", "_")), r.json()
        assert "does not exist" in r.json()["error"]["message"]
    assert c.post("/v1/jobs", json=small_spec(own), headers=b).status_code == 201


def test_the_client_cannot_set_owner_status_or_attempts(world: World) -> None:
    c, b = world.client, bearer(world.b)
    for extra in ({"owner_id": "tester"}, {"owner": "tester"}, {"status": "succeeded"},
                  {"attempts": 5}):
        r = c.post("/v1/jobs", json={**small_spec(world.dataset_id), **extra})
        assert r.status_code == 422, (extra, r.text)
    r = c.post("/v1/datasets", files={"file": ("c.txt", CORPUS.encode(), "text/plain")},
               data={"name": "x", "owner_id": "tester"}, headers=b)
    assert r.status_code == 201  # an unknown form field is ignored ...
    assert c.get(f"/v1/datasets/{r.json()['id']}").status_code == 404  # ... B owns it


def test_the_same_idempotency_key_of_two_principals_makes_two_jobs(world: World) -> None:
    c = world.client
    own = _upload_as(c, world.b)
    key = {"Idempotency-Key": "same"}
    a = c.post("/v1/jobs", json=small_spec(world.dataset_id), headers=key)
    b = c.post("/v1/jobs", json=small_spec(own), headers={**key, **bearer(world.b)})
    assert (a.status_code, b.status_code) == (201, 201), (a.text, b.text)
    assert a.json()["id"] != b.json()["id"]


def test_an_admin_sees_and_manages_every_principals_resources(world: World) -> None:
    c, admin = world.client, bearer(world.admin)
    b_ds = _upload_as(c, world.b)
    listed = {d["id"] for d in c.get("/v1/datasets", headers=admin).json()["data"]}
    assert listed == {world.dataset_id, b_ds}
    assert world.job_id in {j["id"] for j in c.get("/v1/jobs", headers=admin).json()["data"]}
    j = f"/v1/jobs/{world.job_id}"
    for path in (j, f"{j}/metrics", f"{j}/metrics.csv", f"{j}/samples", f"{j}/checkpoints",
                 f"{j}/checkpoints/{world.checkpoint_id}/download",
                 f"/v1/datasets/{world.dataset_id}"):
        assert c.get(path, headers=admin).status_code == 200, path
    assert c.post(f"{j}/cancel", headers=admin).status_code == 202


# -- keys -------------------------------------------------------------------------------------


def test_keys_are_stored_only_as_hashes(
    client: TestClient, make_key: Callable[..., str], session_factory: sessionmaker[Session]
) -> None:
    admin = bearer(make_key("root", admin=True))
    created = client.post("/v1/keys", json={"name": "carol"}, headers=admin)
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert KEY_RE.fullmatch(key)
    assert created.json()["prefix"] == key[:12]
    with session_factory() as s:
        rows = [dict(r._mapping) for r in s.execute(text("SELECT * FROM api_keys"))]
    assert len(rows) == 3  # tester, root, carol
    for row in rows:
        assert set(row) == {"id", "name", "prefix", "key_hash", "is_admin", "created_at",
                            "revoked_at", "last_used_at"}
        assert all(str(v) != key and key not in str(v) for v in row.values()), row
        assert re.fullmatch(r"[0-9a-f]{64}", row["key_hash"])
    carol = next(r for r in rows if r["name"] == "carol")
    assert carol["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    # Listings show prefixes, never keys or hashes.
    listed = client.get("/v1/keys", headers=admin)
    assert key not in listed.text and carol["key_hash"] not in listed.text
    assert {k["prefix"] for k in listed.json()["data"]} >= {key[:12]}
    # The new key works and is a separate principal with nothing yet.
    assert client.get("/v1/jobs", headers=bearer(key)).json()["data"] == []


def test_keys_with_the_same_name_share_their_principal(
    client: TestClient, make_key: Callable[..., str]
) -> None:
    """Rotation: a new key with the same name sees the same resources; the old one is then
    revoked."""
    ds = upload(client).json()["id"]
    new = make_key("tester")
    assert client.get(f"/v1/datasets/{ds}", headers=bearer(new)).status_code == 200


def test_a_non_admin_key_cannot_create_admin_keys_and_names_are_checked(
    client: TestClient, make_key: Callable[..., str]
) -> None:
    r = client.post("/v1/keys", json={"name": "x", "is_admin": True})
    assert r.status_code == 403
    admin = bearer(make_key("root", admin=True))
    for name in ("", "a b", "x" * 41, "nul\x00", "../etc"):
        bad = client.post("/v1/keys", json={"name": name}, headers=admin)
        assert bad.status_code == 422, (name, bad.text)
        assert bad.json()["error"]["field"] == "name"
    assert client.delete("/v1/keys/lmf_nothere", headers=admin).status_code == 404


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMFORGE_HOME": str(settings.lmforge_home),
           "DATABASE_URL": settings.sqlalchemy_url}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_cli_creates_lists_and_revokes_keys(client: TestClient, settings: Settings) -> None:
    created = _cli(settings, "keys", "create", "--name", "dave", "--admin")
    assert created.returncode == 0, created.stderr
    # The key is the only line on stdout (scripts capture it).
    assert created.stdout.count("\n") == 1
    key = created.stdout.strip()
    assert KEY_RE.fullmatch(key), created.stdout
    assert client.get("/v1/keys", headers=bearer(key)).status_code == 200  # an admin key

    listed = _cli(settings, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert key[:12] in listed.stdout and key not in listed.stdout
    assert "dave" in listed.stdout and "tester" in listed.stdout

    revoked = _cli(settings, "keys", "revoke", key[:12])
    assert revoked.returncode == 0, revoked.stderr
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 401
    again = _cli(settings, "keys", "revoke", key)  # the whole key pasted: its prefix is used
    assert again.returncode == 0 and "already revoked" in again.stdout, again
    assert key not in again.stdout + again.stderr
    unknown = "lmf_nothere" + "x" * 36
    missing = _cli(settings, "keys", "revoke", unknown)
    assert missing.returncode == 1 and unknown not in missing.stderr  # never echoes a secret
    bad = _cli(settings, "keys", "create", "--name", "no spaces")
    assert (bad.returncode, bad.stdout) == (2, "")


def test_auth_disabled_acts_as_an_admin_and_is_refused_off_loopback(
    tmp_path: Path, settings: Settings
) -> None:
    from app.auth import check_bind, is_loopback
    from app.main import create_app

    open_settings = settings.model_copy(update={"auth": "disabled"})
    with TestClient(create_app(open_settings), raise_server_exceptions=False) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get("/v1/keys").status_code == 200  # admin
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    check_bind("disabled", "127.0.0.1")
    check_bind("required", "0.0.0.0")
    with pytest.raises(SystemExit, match="only allowed on a loopback address"):
        check_bind("disabled", "0.0.0.0")
    # The CLI reads LMFORGE_AUTH from the environment: run it with the variable set.
    env = {**os.environ, "LMFORGE_AUTH": "disabled", "LMFORGE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "api", "--host", "0.0.0.0",
                        "--port", "1"], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode != 0
    assert "only allowed on a loopback address" in r.stderr


def test_answers_name_their_owner_so_that_an_admin_can_tell_whose_they_are(
    world: World,
) -> None:
    """``owner_id`` is the submitting key's principal (``tester``), never the client's."""
    admin = bearer(world.admin)
    job = world.client.get(f"/v1/jobs/{world.job_id}", headers=admin).json()
    dataset = world.client.get(f"/v1/datasets/{world.dataset_id}", headers=admin).json()
    assert job["owner_id"] == dataset["owner_id"] == "tester"
    listed = world.client.get("/v1/jobs", headers=admin).json()["data"]
    assert {j["owner_id"] for j in listed if j["id"] == world.job_id} == {"tester"}
