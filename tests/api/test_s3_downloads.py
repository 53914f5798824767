"""Checkpoint downloads from S3 storage (a real moto server process, tests/support/s3.py):
every test of tests/api/test_downloads.py again, with the API's storage in a bucket (HEAD,
ETag/304, If-Modified-Since, ranges, several ranges, If-Range, 400/416), plus a damaged object
(503 checkpoint_corrupt), a missing one (503 blob_missing) and presigned downloads (307 to a
URL that serves the exact bytes without credentials)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from store.integrations import tensorboard_key
from store.models import Checkpoint
from store.settings import Settings
from tests.api import test_downloads as base
from tests.api.conftest import upload
from tests.support.s3 import MotoServer, make_bucket, s3_client, s3_env

Factory = sessionmaker[Session]
DATA, ETAG = base.DATA, base.ETAG
url = base.url  # the fixture: a checkpoint of DATA recorded through the API's storage

# The tests of test_downloads.py, run here on S3 storage (the damaged-file one writes to a
# local path: its S3 counterpart is below).
_LOCAL_ONLY = {"test_a_damaged_checkpoint_is_503_for_head_and_ranges_too"}
for _name in dir(base):
    if _name.startswith("test_") and _name not in _LOCAL_ONLY:
        globals()[_name] = getattr(base, _name)


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    return make_bucket(s3_server)


@pytest.fixture
def settings(tmp_path: Path, s3_server: MotoServer, bucket: str,
             monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in s3_env(s3_server, bucket, prefix="api").items():
        monkeypatch.setenv(name, value)
    return Settings(
        LMFORGE_HOME=tmp_path / "home",
        DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}",
        LMFORGE_MAX_UPLOAD_BYTES=64 * 1024,
    )  # type: ignore[call-arg]


def _object_key(url: str, factory: Factory) -> str:
    with factory() as s:
        row = s.get(Checkpoint, url.split("/")[-2])
        assert row is not None
        return f"api/{row.storage_key}"


def test_the_blobs_are_in_the_bucket_not_under_the_home(
        client: TestClient, url: str, settings: Settings, s3_server: MotoServer, bucket: str,
        session_factory: Factory) -> None:
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(
        Bucket=bucket)["Contents"]]
    assert _object_key(url, session_factory) in keys
    assert any(k.startswith("api/datasets/") for k in keys)
    assert not settings.storage_dir.exists()


def test_a_damaged_object_is_503_for_get_head_and_ranges(
        client: TestClient, url: str, session_factory: Factory, s3_server: MotoServer,
        bucket: str) -> None:
    assert client.get(url).status_code == 200  # verified once, remembered for this version
    # Same size, one byte changed, the recorded sha256 kept: a new version of the object.
    s3_client(s3_server).put_object(
        Bucket=bucket, Key=_object_key(url, session_factory), Body=DATA[:-1] + b"\x00",
        Metadata={"sha256": ETAG.strip('"')})
    for r in (client.get(url), client.head(url), client.get(url, headers={"Range": "bytes=0-1"})):
        assert r.status_code == 503
    assert client.get(url).json()["error"]["code"] == "checkpoint_corrupt"


def test_an_object_recording_another_sha256_is_503(
        client: TestClient, url: str, session_factory: Factory, s3_server: MotoServer,
        bucket: str) -> None:
    s3_client(s3_server).put_object(
        Bucket=bucket, Key=_object_key(url, session_factory), Body=b"other bytes",
        Metadata={"sha256": "0" * 64})
    r = client.get(url)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "checkpoint_corrupt")


def test_a_missing_object_is_503_blob_missing(
        client: TestClient, url: str, session_factory: Factory, s3_server: MotoServer,
        bucket: str) -> None:
    s3_client(s3_server).delete_object(Bucket=bucket, Key=_object_key(url, session_factory))
    r = client.get(url)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "blob_missing")


@pytest.fixture
def presign(settings: Settings) -> Settings:
    settings.download_presign_s = 60
    return settings


def test_with_presigning_a_download_is_307_to_a_url_serving_the_bytes(
        presign: Settings, client: TestClient, url: str, s3_server: MotoServer) -> None:
    r = client.get(url, follow_redirects=False)
    assert r.status_code == 307, r.text
    location = r.headers["location"]
    assert location.startswith(s3_server.endpoint_url)
    assert r.headers["etag"] == ETAG
    got: Any = httpx.get(location)  # no API key, no AWS credentials: the URL is the grant
    assert (got.status_code, got.content) == (200, DATA)
    assert got.headers["content-disposition"].startswith("attachment; filename=")
    # HEAD and conditional requests are still the API's.
    assert client.head(url).status_code == 200
    assert client.get(url, headers={"If-None-Match": ETAG},
                      follow_redirects=False).status_code == 304


def test_an_upload_to_a_store_that_fails_is_503_storage_unavailable(
        client: TestClient, url: str, s3_server: MotoServer, bucket: str) -> None:
    s3 = s3_client(s3_server)
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=o["Key"])
    s3.delete_bucket(Bucket=bucket)  # the bucket is gone: a configuration error
    r = upload(client, "some text to store\n" * 20, name="after")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "storage_unavailable"
    assert bucket in r.json()["error"]["message"]


def test_a_damaged_tensorboard_archive_is_503_blob_corrupt(
        client: TestClient, url: str, s3_server: MotoServer, bucket: str) -> None:
    job_id = url.split("/")[3]  # /v1/jobs/<job>/checkpoints/<id>/download
    s3 = s3_client(s3_server)
    key = f"api/{tensorboard_key(job_id)}"
    s3.put_object(Bucket=bucket, Key=key, Body=b"not the archive it recorded",
                  Metadata={"sha256": "0" * 64})
    r = client.get(f"/v1/jobs/{job_id}/tensorboard.tar.gz")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "blob_corrupt"), r.text
    body = b"an archive"
    s3.put_object(Bucket=bucket, Key=key, Body=body,
                  Metadata={"sha256": hashlib.sha256(body).hexdigest()})
    r = client.get(f"/v1/jobs/{job_id}/tensorboard.tar.gz")
    assert (r.status_code, r.content) == (200, body)
