"""S3Storage against a real S3-compatible server process (moto's server mode,
tests/support/s3.py): round trips (single and multipart uploads), the upload limit, deletes,
key validation, damaged objects, seekable reads, presigned URLs, and make_storage's choice."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.errors import PayloadTooLarge
from store.s3storage import S3Storage
from store.settings import Settings
from store.storage import BlobCorrupt, LocalStorage, make_storage, parse_storage_url
from tests.support.s3 import MotoServer, make_bucket, s3_client, s3_env

MiB = 1024 * 1024
# S3's smallest part (boto3 raises smaller chunk sizes to it): the multipart blobs are a few
# parts of it.
PART = 5 * MiB


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    return make_bucket(s3_server)


@pytest.fixture
def client(s3_server: MotoServer) -> Any:
    return s3_client(s3_server)


@pytest.fixture
def storage(bucket: str, client: Any) -> S3Storage:
    return S3Storage(bucket, "pre/fix", client, multipart_threshold=PART,
                     multipart_chunksize=PART)


def _objects(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_small_blob_round_trips_with_its_sha256_recorded(
        storage: S3Storage, client: Any, bucket: str) -> None:
    data = b"hello, object store\n" * 100
    n, sha = storage.put_bytes("datasets/ds_1.txt", data)
    assert (n, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert storage.read_bytes("datasets/ds_1.txt") == data
    assert b"".join(storage.iter_bytes("datasets/ds_1.txt", chunk_size=7)) == data
    head = client.head_object(Bucket=bucket, Key="pre/fix/datasets/ds_1.txt")
    assert head["Metadata"]["sha256"] == sha
    assert "-" not in head["ETag"]  # one PutObject
    assert _objects(client, bucket) == ["pre/fix/datasets/ds_1.txt"]


def test_a_large_blob_is_uploaded_in_parts_and_round_trips(
        storage: S3Storage, client: Any, bucket: str) -> None:
    data = os.urandom(2 * PART + 12345)
    chunks = [data[i:i + MiB] for i in range(0, len(data), MiB)]
    n, sha = storage.put_stream("checkpoints/j/c.safetensors", chunks)
    assert (n, sha) == (len(data), hashlib.sha256(data).hexdigest())
    head = client.head_object(Bucket=bucket, Key="pre/fix/checkpoints/j/c.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts
    info = storage.head("checkpoints/j/c.safetensors")
    assert info is not None and info.sha256 == sha and info.size == len(data)
    got = storage.read_bytes("checkpoints/j/c.safetensors")
    assert hashlib.sha256(got).hexdigest() == sha


def test_open_is_seekable(storage: S3Storage) -> None:
    data = bytes(range(256)) * 40
    storage.put_bytes("a/b.bin", data)
    with storage.open("a/b.bin") as fh:
        assert fh.seekable()
        fh.seek(1000)
        assert fh.read(10) == data[1000:1010]
        fh.seek(-5, os.SEEK_END)
        assert fh.read() == data[-5:]
        fh.seek(0)
        assert fh.read() == data


def test_past_max_bytes_the_write_is_refused_and_nothing_is_stored(
        storage: S3Storage, client: Any, bucket: str) -> None:
    with pytest.raises(PayloadTooLarge):
        storage.put_stream("datasets/big.txt", [b"x" * 600, b"y" * 600], max_bytes=1000)
    assert not storage.exists("datasets/big.txt")
    assert _objects(client, bucket) == []


def test_a_failing_write_stores_nothing(storage: S3Storage, client: Any, bucket: str) -> None:
    def chunks() -> Any:
        yield b"part one"
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        storage.put_stream("datasets/half.txt", chunks())
    assert _objects(client, bucket) == []


def test_exists_and_delete(storage: S3Storage) -> None:
    assert not storage.exists("x/y.txt")
    storage.put_bytes("x/y.txt", b"1")
    assert storage.exists("x/y.txt")
    storage.delete("x/y.txt")
    assert not storage.exists("x/y.txt")
    storage.delete("x/y.txt")  # a missing key is not an error
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("x/y.txt")
    with pytest.raises(FileNotFoundError):
        storage.open("x/y.txt")


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../b", "a/.hidden", "a\\b", "a//b",
                                 "a/b/", "nul\x00", "x" * 1025, "new\nline"])
def test_invalid_keys_are_refused(storage: S3Storage, key: str) -> None:
    for op in (lambda: storage.put_bytes(key, b"1"), lambda: storage.read_bytes(key),
               lambda: storage.exists(key), lambda: storage.delete(key),
               lambda: storage.presigned_url(key, 60)):
        with pytest.raises(ValueError, match="invalid storage key"):
            op()


def test_a_damaged_object_is_detected_on_read(
        storage: S3Storage, client: Any, bucket: str) -> None:
    data = b"the original bytes " * 50
    _, sha = storage.put_bytes("checkpoints/j/c1.safetensors", data)
    # Damage it in the store, keeping its recorded sha256 (as bit rot or a bad copy would).
    client.put_object(Bucket=bucket, Key="pre/fix/checkpoints/j/c1.safetensors",
                      Body=b"the damaged bytes!" + data[18:], Metadata={"sha256": sha})
    with pytest.raises(BlobCorrupt, match="sha256"):
        storage.read_bytes("checkpoints/j/c1.safetensors")
    with pytest.raises(BlobCorrupt):
        storage.open("checkpoints/j/c1.safetensors")
    with pytest.raises(BlobCorrupt):
        next(storage.iter_bytes("checkpoints/j/c1.safetensors"))


def test_a_presigned_url_serves_the_exact_bytes(storage: S3Storage) -> None:
    data = os.urandom(3000)
    storage.put_bytes("checkpoints/j/c2.safetensors", data)
    url = storage.presigned_url("checkpoints/j/c2.safetensors", 60,
                                'attachment; filename="c2.safetensors"')
    r = httpx.get(url)  # no credentials: the signature is in the URL
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-disposition"] == 'attachment; filename="c2.safetensors"'


def test_stream_serves_a_range(storage: S3Storage) -> None:
    data = bytes(range(256)) * 4
    storage.put_bytes("r/a.bin", data)
    info = storage.head("r/a.bin")
    assert info is not None
    assert b"".join(storage.stream("r/a.bin", byte_range=(10, 19), if_match=info.etag)) \
        == data[10:20]
    assert storage.sha256_of("r/a.bin") == hashlib.sha256(data).hexdigest()


def test_make_storage_picks_the_backend(
        s3_server: MotoServer, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    local = make_storage(Settings(LMFORGE_HOME=tmp_path))  # type: ignore[call-arg]
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "storage").resolve()
    for name, value in s3_env(s3_server, bucket, prefix="svc").items():
        monkeypatch.setenv(name, value)
    remote = make_storage(Settings(LMFORGE_HOME=tmp_path))  # type: ignore[call-arg]
    assert isinstance(remote, S3Storage)
    assert (remote.bucket, remote.prefix) == (bucket, "svc")
    remote.put_bytes("datasets/d.txt", b"through the environment")
    assert s3_client(s3_server).get_object(
        Bucket=bucket, Key="svc/datasets/d.txt")["Body"].read() == b"through the environment"
    assert not (tmp_path / "storage").exists()


@pytest.mark.parametrize("url", ["http://bucket/x", "s3://", "s3://Up_Case/x", "s3://b/x",
                                 "s3://bucket/../x", "s3://key:secret@bucket/x",
                                 "s3://bucket:9000/x", "s3://bucket/x?versioning=1"])
def test_a_malformed_storage_url_is_a_clear_error(url: str) -> None:
    with pytest.raises(ValueError, match="LMFORGE_STORAGE_URL"):
        parse_storage_url(url)
    with pytest.raises(ValueError, match="LMFORGE_STORAGE_URL"):
        Settings(LMFORGE_STORAGE_URL=url)  # type: ignore[call-arg]


def test_a_storage_url_splits_into_bucket_and_prefix() -> None:
    assert parse_storage_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_storage_url("s3://my-bucket/") == ("my-bucket", "")
    assert parse_storage_url("s3://my.bucket/a/b_c/") == ("my.bucket", "a/b_c")


def _damage(client: Any, bucket: str, object_key: str) -> None:
    """Replace the object's bytes, keeping its recorded sha256 (bit rot, a bad copy)."""
    head = client.head_object(Bucket=bucket, Key=object_key)
    client.put_object(Bucket=bucket, Key=object_key, Body=b"not the checkpoint",
                      Metadata=head["Metadata"])


def test_the_inference_server_answers_a_damaged_object_with_checkpoint_corrupt(
        storage: S3Storage, client: Any, bucket: str) -> None:
    """store.storage.BlobCorrupt becomes 503 checkpoint_corrupt (a missing object:
    blob_missing), not a crash."""
    import torch

    from core.errors import ServiceUnavailable
    from core.inference import CheckpointRef
    from worker.serve.models import ModelCache

    data = b"some checkpoint bytes" * 10
    _, sha = storage.put_bytes("checkpoints/j/c9.safetensors", data)
    _damage(client, bucket, "pre/fix/checkpoints/j/c9.safetensors")
    cache = ModelCache(storage, 1, torch.device("cpu"))
    with pytest.raises(ServiceUnavailable) as err:
        cache.get(CheckpointRef(id="ckpt_9", storage_key="checkpoints/j/c9.safetensors",
                                sha256=sha))
    assert err.value.code == "checkpoint_corrupt"
    storage.delete("checkpoints/j/c9.safetensors")
    with pytest.raises(ServiceUnavailable) as err:
        cache.get(CheckpointRef(id="ckpt_9", storage_key="checkpoints/j/c9.safetensors",
                                sha256=sha))
    assert err.value.code == "blob_missing"


def test_resuming_skips_a_damaged_checkpoint_object(
        storage: S3Storage, client: Any, bucket: str, tmp_path: Path) -> None:
    from app.auth import Principal
    from app.jobs import create_job
    from core.contract import CheckpointBlob
    from core.contract import CheckpointKind as K
    from core.spec import JobSpec
    from store.db import make_engine, make_session_factory, session_scope, upgrade_database
    from store.progress import claim_job, record_checkpoint, resume_point

    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade_database(url)
    factory = make_session_factory(make_engine(url))
    spec = JobSpec.model_validate({"dataset": {"builtin": "python-docs"},
                                   "tokenizer": {"kind": "char"},
                                   "training": {"max_steps": 10}})
    with session_scope(factory) as s:
        job_id = create_job(s, Principal(id="p", name="p", is_admin=False), spec).id
    with session_scope(factory) as s:
        claim_job(s, job_id, "w1")
    with session_scope(factory) as s:
        early, _ = record_checkpoint(s, storage, job_id, 1,
                                     CheckpointBlob(K.PERIODIC, 2, b"step two", {}), 3)
        late, _ = record_checkpoint(s, storage, job_id, 1,
                                    CheckpointBlob(K.LAST, 4, b"step four", {}), 3)
        early_key, late_key = early.storage_key, late.storage_key
    _damage(client, bucket, f"pre/fix/{late_key}")
    with session_scope(factory) as s:
        point = resume_point(s, storage, job_id)
    assert (point.data, point.step) == (b"step two", 2)  # the damaged later one is skipped
    assert late_key in point.stale and early_key not in point.stale


def test_a_store_that_cannot_be_used_is_storage_unavailable(
        s3_server: MotoServer, client: Any) -> None:
    from lmforge.processes import free_port
    from store.storage import StorageUnavailable

    no_bucket = S3Storage("lmforge-no-such-bucket", "", client)
    for missing_bucket_op in (lambda: no_bucket.put_bytes("a/b", b"1"),
                              lambda: no_bucket.read_bytes("a/b")):
        with pytest.raises(StorageUnavailable) as err:
            missing_bucket_op()
        assert err.value.code == "storage_unavailable"
        assert "lmforge-no-such-bucket" in err.value.message
    import boto3
    from botocore.config import Config

    closed = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
                          aws_access_key_id="x", aws_secret_access_key="y",
                          region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    down = S3Storage("bucket", "", closed)
    ops: list[Callable[[], object]] = [
        lambda: down.put_bytes("a/b", b"1"), lambda: down.exists("a/b"),
        lambda: down.read_bytes("a/b")]
    for op in ops:
        with pytest.raises(StorageUnavailable):
            op()
