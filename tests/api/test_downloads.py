"""Checkpoint downloads and RFC 9110: ``HEAD`` gives the headers of ``GET`` and no body, the
strong ``ETag`` is the sha256, a conditional ``GET`` that matches it is 304 with no body, and
``Range`` requests get the bytes asked for."""

from __future__ import annotations

import hashlib
from email.utils import formatdate

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.contract import CheckpointBlob
from core.contract import CheckpointKind as K
from store.db import session_scope
from store.progress import claim_job, record_checkpoint
from tests.api.conftest import small_spec

Factory = sessionmaker[Session]
DATA = bytes(range(256)) * 40  # 10240 bytes, every byte value


@pytest.fixture
def url(client: TestClient, dataset_id: str, session_factory: Factory) -> str:
    job_id = client.post("/v1/jobs", json=small_spec(dataset_id)).json()["id"]
    with session_scope(session_factory) as s:
        claim_job(s, job_id, "w1")
    storage = client.app.state.storage  # type: ignore[attr-defined]
    with session_scope(session_factory) as s:
        row, _ = record_checkpoint(s, storage, job_id, 1, CheckpointBlob(K.LAST, 4, DATA, {}), 3)
    return f"/v1/jobs/{job_id}/checkpoints/{row.id}/download"


ETAG = f'"{hashlib.sha256(DATA).hexdigest()}"'


def test_get_sends_a_strong_etag_that_is_the_sha256(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert (r.status_code, r.content) == (200, DATA)
    assert r.headers["etag"] == ETAG
    assert r.headers["content-length"] == str(len(DATA))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/octet-stream"


def test_head_sends_the_headers_of_get_and_no_body(client: TestClient, url: str) -> None:
    same_id = {"X-Request-ID": "head-vs-get"}  # else each answer has an id of its own
    get = client.get(url, headers=same_id)
    head = client.head(url, headers=same_id)
    assert head.status_code == 200
    assert head.content == b""
    assert dict(head.headers) == dict(get.headers)


@pytest.mark.parametrize("if_none_match", [ETAG, f"W/{ETAG}", f'"other", {ETAG}', "*"])
def test_a_conditional_get_with_a_matching_etag_is_304_without_a_body(
    client: TestClient, url: str, if_none_match: str
) -> None:
    for method in (client.get, client.head):
        r = method(url, headers={"If-None-Match": if_none_match})
        assert r.status_code == 304, r.text
        assert r.content == b""
        assert r.headers["etag"] == ETAG


def test_a_conditional_get_with_another_etag_gets_the_body(client: TestClient,
                                                           url: str) -> None:
    r = client.get(url, headers={"If-None-Match": '"0123", W/"abcd"'})
    assert (r.status_code, r.content) == (200, DATA)


def test_if_modified_since_is_304_unless_the_file_is_newer(client: TestClient, url: str) -> None:
    last_modified = client.head(url).headers["last-modified"]
    assert client.get(url, headers={"If-Modified-Since": last_modified}).status_code == 304
    assert client.get(url, headers={"If-Modified-Since": formatdate(0, usegmt=True)}
                      ).status_code == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    r = client.get(url, headers={"If-Modified-Since": last_modified, "If-None-Match": '"x"'})
    assert (r.status_code, r.content) == (200, DATA)


@pytest.mark.parametrize(("spec", "start", "end"), [("0-9", 0, 10), ("10000-", 10000, 10240),
                                                    ("-5", 10235, 10240),
                                                    ("100-99999", 100, 10240)])
def test_a_range_request_gets_206_with_those_bytes(
    client: TestClient, url: str, spec: str, start: int, end: int
) -> None:
    r = client.get(url, headers={"Range": f"bytes={spec}"})
    assert r.status_code == 206, r.text
    assert r.content == DATA[start:end]
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert r.headers["etag"] == ETAG


def test_several_ranges_come_as_multipart_byteranges(client: TestClient, url: str) -> None:
    r = client.get(url, headers={"Range": "bytes=0-1,100-101"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert DATA[0:2] in r.content and DATA[100:102] in r.content


def test_if_range_serves_the_range_only_for_the_current_etag(client: TestClient,
                                                             url: str) -> None:
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": ETAG})
    assert (r.status_code, r.content) == (206, DATA[:10])
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (r.status_code, r.content) == (200, DATA)


def test_a_range_past_the_end_is_416_in_the_error_shape(client: TestClient, url: str) -> None:
    r = client.get(url, headers={"Range": "bytes=20000-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(DATA)}"
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (
        "range_not_satisfiable", "Range")


@pytest.mark.parametrize("bad", ["bytes=x-y", "bytes=9-3", "lines=0-1"])
def test_a_malformed_range_is_400_naming_it(client: TestClient, url: str, bad: str) -> None:
    r = client.get(url, headers={"Range": bad})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == ("invalid_range", "Range")


def test_a_damaged_checkpoint_is_503_for_head_and_ranges_too(
    client: TestClient, url: str, session_factory: Factory
) -> None:
    assert client.get(url).status_code == 200  # verified once, remembered for this file
    storage = client.app.state.storage  # type: ignore[attr-defined]
    ckpt_id = url.split("/")[-2]
    from store.models import Checkpoint

    with session_factory() as s:
        key = s.get(Checkpoint, ckpt_id).storage_key  # type: ignore[union-attr]
    storage.path(key).write_bytes(DATA[:-1] + b"\x00")  # same size, one byte changed
    for r in (client.get(url), client.head(url), client.get(url, headers={"Range": "bytes=0-1"})):
        assert r.status_code == 503
    assert client.get(url).json()["error"]["code"] == "checkpoint_corrupt"


def test_head_of_an_unknown_checkpoint_is_404(client: TestClient, url: str) -> None:
    assert client.head(url.replace("/checkpoints/", "/checkpoints/x")).status_code == 404
