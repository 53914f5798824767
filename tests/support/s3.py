"""A real S3-compatible server for the tests: ``moto``'s server mode as a subprocess.

``moto`` (extra ``dev``) ships an HTTP server that speaks the S3 REST API
(``python -m moto.server -H HOST -p PORT``); the service's processes reach it exactly as they
would reach AWS S3 or MinIO: over HTTP, through boto3, with ``AWS_ENDPOINT_URL`` set. Nothing
is mocked in-process. The server keeps its objects in memory and lives for the test session.

- ``s3_server`` (session fixture): the running server (``.endpoint_url``).
- ``make_bucket(server)``: a fresh, empty bucket of the test's own; returns its name.
- ``s3_env(server, bucket, prefix)``: the environment a process needs to use it as the
  service's storage (``LMFORGE_STORAGE_URL=s3://BUCKET/PREFIX`` and the standard ``AWS_*``
  variables boto3 reads).
- ``s3_client(server)``: a boto3 S3 client for the test itself (to look at or tamper with
  objects directly).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from lmforge.processes import EmbeddedServerError, _ChildServer

if TYPE_CHECKING:
    from pathlib import Path

# moto accepts any credentials; these are what every test process is given.
ACCESS_KEY_ID = "lmforge-test"
SECRET_ACCESS_KEY = "lmforge-test-secret"
REGION = "us-east-1"


class MotoServer(_ChildServer):
    """``python -m moto.server`` on 127.0.0.1 (a free port), in the foreground; logs to
    ``dir/moto.log``. Ready once it answers S3's ListBuckets (``GET /``) with 200."""

    name = "moto"
    start_timeout_s = 60.0

    def __init__(self, *, dir: Path | str, port: int | None = None) -> None:
        super().__init__(dir, port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint (``AWS_ENDPOINT_URL``), e.g. ``http://127.0.0.1:53211``."""
        return self.url

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False


def s3_client(server: MotoServer) -> Any:
    """A boto3 S3 client on ``server`` with the test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
    )


def make_bucket(server: MotoServer) -> str:
    """Create a fresh, empty bucket on ``server``; returns its name (``lmforge-test-<hex>``)."""
    name = f"lmforge-test-{uuid.uuid4().hex[:12]}"
    s3_client(server).create_bucket(Bucket=name)
    return name


def s3_env(server: MotoServer, bucket: str, prefix: str = "lmforge") -> dict[str, str]:
    """The environment variables that make a process store blobs in ``s3://bucket/prefix``
    on ``server``: ``LMFORGE_STORAGE_URL`` and the standard ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``."""
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return {
        "LMFORGE_STORAGE_URL": url,
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real moto S3 server process for the session (skips when moto is not installed)."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no S3 test server (pip install 'lmforge[dev]'): {exc}")
    server = MotoServer(dir=tmp_path_factory.mktemp("moto"))
    try:
        server.start()
    except EmbeddedServerError as exc:
        pytest.fail(f"the moto S3 server did not start: {exc}")
    yield server
    server.stop()
