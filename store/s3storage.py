"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...) through boto3.

Selected with ``LMFORGE_STORAGE_URL=s3://BUCKET/PREFIX`` (:func:`store.storage.make_storage`);
boto3 reads the endpoint, credentials and region from the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, or any other source of its credential chain). A storage key ``K``
(:data:`store.storage.KEY_PATTERN`, checked as in ``LocalStorage``) is the object
``PREFIX/K`` of the bucket.

Writes: the chunks go to an anonymous local temporary file (``TMPDIR``), counted against
``max_bytes`` and hashed as they are written; only when the block succeeds is the file uploaded
(boto3's managed transfer: one ``PutObject`` below ``multipart_threshold`` bytes, else a
multipart upload in parts of ``multipart_chunksize`` bytes, several at a time), with S3's own
``SHA256`` checksum (the store checks each part on arrival) and the blob's full sha256 (hex) as
the object's metadata ``x-amz-meta-sha256``. An object appears whole or not at all (S3's
semantics), so a failed or refused write stores nothing.

Reads are checked end to end: every read (:meth:`S3Storage.open`, :meth:`~S3Storage.read_bytes`,
:meth:`~S3Storage.iter_bytes`) downloads the object to an anonymous temporary file while hashing
it, and raises :class:`store.storage.BlobCorrupt` when the bytes do not match the recorded
sha256, before the caller sees any of them (an object without that metadata, written by another
tool, is returned as is: the callers check every blob against the sha256 of its database row
anyway). A missing object is ``FileNotFoundError``, as for a missing file; any other failure of
the store (unreachable, refused credentials, a missing bucket) is
:class:`store.storage.StorageUnavailable` (503 ``storage_unavailable`` in the API), after
boto3's own retries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, cast

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from store.storage import (
    CHUNK_BYTES,
    BlobCorrupt,
    BlobWriter,
    StorageUnavailable,
    WriterPuts,
    check_key,
)

# The object metadata that records a blob's sha256 (hex); S3 sends it as x-amz-meta-sha256.
SHA256_METADATA = "sha256"
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class ObjectInfo:
    """What ``HeadObject`` says of a stored blob: ``size`` (bytes), ``etag`` (the store's
    entity tag, quoted; ``"<md5>-<parts>"`` for a multipart upload), ``last_modified`` (UTC),
    ``sha256`` (hex, from ``x-amz-meta-sha256``; None when the object has none) and
    ``parts`` (how many parts it was uploaded in; None when the store does not say)."""

    size: int
    etag: str
    last_modified: datetime
    sha256: str | None
    parts: int | None = None


@contextmanager
def store_errors(where: str) -> Iterator[None]:
    """Translate boto3's errors in the block: a missing object (404) to
    ``FileNotFoundError``, anything else to :class:`StorageUnavailable` naming ``where``."""
    try:
        yield
    except ClientError as exc:
        if is_missing(exc):
            raise FileNotFoundError(f"no object {where}") from exc
        raise StorageUnavailable(f"the object store failed on {where}: {exc}") from exc
    except (BotoCoreError, Boto3Error) as exc:  # unreachable; a failed managed upload
        raise StorageUnavailable(f"the object store cannot be reached for {where}: {exc}"
                                 ) from exc


def is_missing(exc: ClientError) -> bool:
    """True when ``exc`` says the object does not exist (``NoSuchKey``, or a ``HEAD``'s bare
    404; not ``NoSuchBucket``, a configuration error)."""
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING_CODES


class S3Storage(WriterPuts):
    """The :class:`store.storage.Storage` protocol over ``bucket`` under ``prefix`` (no leading
    or trailing "/"; "" for the bucket's root).

    ``client``: a boto3 S3 client to use; None (the default) makes one per process on first
    use, from the standard AWS configuration (a client is not shared across ``fork``).
    ``multipart_threshold`` / ``multipart_chunksize`` (bytes): boto3's ``TransferConfig``; S3
    takes parts of at least 5 MiB (smaller ones are raised to 5 MiB by boto3).
    ``addressing_style``: ``"auto"``, ``"path"`` (MinIO) or ``"virtual"``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any | None = None,
        *,
        multipart_threshold: int = 64 * 1024**2,
        multipart_chunksize: int = 16 * 1024**2,
        addressing_style: str = "auto",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize)
        self._addressing_style = addressing_style
        self._client = client
        self._client_pid = os.getpid() if client is not None else None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix})"

    # -- the client --------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 S3 client (made on first use in each process when none was given)."""
        with self._lock:
            if self._client is None or (self._client_pid not in (None, os.getpid())):
                self._client = boto3.session.Session().client(
                    "s3",
                    config=Config(signature_version="s3v4",
                                  s3={"addressing_style": self._addressing_style},
                                  retries={"mode": "standard"}),
                )
                self._client_pid = os.getpid()
            return self._client

    def url(self, object_key: str) -> str:
        """``s3://BUCKET/OBJECT_KEY``, for messages."""
        return f"s3://{self.bucket}/{object_key}"

    def object_key(self, key: str) -> str:
        """The object key of storage key ``key`` (``PREFIX/key``). Raises ``ValueError`` for a
        key that is not of the shape :data:`store.storage.KEY_PATTERN`."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- writes ------------------------------------------------------------------------------
    @contextmanager
    def writer(self, key: str, max_bytes: int | None = None) -> Iterator[BlobWriter]:
        """Write chunks into a local temporary file; when the block succeeds, upload it to
        ``key`` (multipart past the threshold) with its sha256. Nothing is stored when the
        block raises (``PayloadTooLarge`` past ``max_bytes`` included)."""
        object_key = self.object_key(key)
        with tempfile.TemporaryFile(prefix="lmforge-s3-") as fh:
            w = BlobWriter(cast(BinaryIO, fh), max_bytes)
            yield w
            fh.flush()
            fh.seek(0)
            with store_errors(self.url(object_key)):
                self.client.upload_fileobj(
                    fh, self.bucket, object_key,
                    ExtraArgs={"Metadata": {SHA256_METADATA: w.sha256},
                               "ChecksumAlgorithm": "SHA256",
                               "ContentType": "application/octet-stream"},
                    Config=self.transfer_config,
                )

    # -- reads -------------------------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        """The blob as a readable, seekable binary file (an anonymous local temporary file,
        gone once closed), its bytes checked against the recorded sha256 first. Raises
        ``FileNotFoundError`` when there is no such object, :class:`BlobCorrupt` when the
        bytes do not match, :class:`StorageUnavailable` when the store fails, ``ValueError``
        for an invalid key."""
        where = self.url(self.object_key(key))
        fh = tempfile.TemporaryFile(prefix="lmforge-s3-")
        try:
            digest = hashlib.sha256()
            with store_errors(where):
                resp = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
                expected = (resp.get("Metadata") or {}).get(SHA256_METADATA)
                body = resp["Body"]
                try:
                    for chunk in body.iter_chunks(CHUNK_BYTES):
                        digest.update(chunk)
                        fh.write(chunk)
                finally:
                    body.close()
            if expected is not None and digest.hexdigest() != expected:
                raise BlobCorrupt(
                    f"{where} is damaged: its bytes' sha256 {digest.hexdigest()} is not the "
                    f"recorded {expected}")
            fh.seek(0)
        except BaseException:
            fh.close()
            raise
        return cast(BinaryIO, fh)

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The blob's bytes in chunks, all checked (see :meth:`open`) before the first one."""
        with self.open(key) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error (``DeleteObject`` is idempotent)."""
        object_key = self.object_key(key)
        with store_errors(self.url(object_key)):
            self.client.delete_object(Bucket=self.bucket, Key=object_key)

    # -- for the API's downloads (app.routes.files) -------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        """The object's :class:`ObjectInfo`, or None when there is none."""
        object_key = self.object_key(key)
        try:
            with store_errors(self.url(object_key)):
                h = self.client.head_object(Bucket=self.bucket, Key=object_key)
        except FileNotFoundError:
            return None
        return ObjectInfo(size=int(h["ContentLength"]), etag=str(h["ETag"]),
                          last_modified=h["LastModified"],
                          sha256=(h.get("Metadata") or {}).get(SHA256_METADATA),
                          parts=h.get("PartsCount"))

    def stream(
        self, key: str, *, if_match: str | None = None,
        byte_range: tuple[int, int] | None = None, chunk_size: int = CHUNK_BYTES,
    ) -> Iterator[bytes]:
        """The object's bytes (or bytes ``start..end`` inclusive of ``byte_range``) straight
        from the store, unchecked (the caller verified this version, ``if_match`` = its
        ETag; a changed object then fails the request). The request is sent now, so a
        missing object (``FileNotFoundError``) or a changed one (:class:`StorageUnavailable`,
        S3's ``PreconditionFailed``) raises here, before any byte is yielded."""
        where = self.url(self.object_key(key))
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if if_match is not None:
            args["IfMatch"] = if_match
        if byte_range is not None:
            args["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        with store_errors(where):
            body = self.client.get_object(**args)["Body"]
        return _chunks(body, chunk_size, where)

    def sha256_of(self, key: str, if_match: str | None = None) -> str:
        """The sha256 (hex) of the object's bytes, read through once (no local copy)."""
        digest = hashlib.sha256()
        for chunk in self.stream(key, if_match=if_match):
            digest.update(chunk)
        return digest.hexdigest()

    def presigned_url(self, key: str, expires_s: int, disposition: str | None = None) -> str:
        """A URL that GETs the object without credentials for ``expires_s`` seconds
        (``GetObject`` signed with this process's credentials, SigV4). ``disposition``: the
        ``Content-Disposition`` header value the store answers with (S3's
        ``response-content-disposition``), e.g. ``app.routes.files.content_disposition``'s."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if disposition is not None:
            params["ResponseContentDisposition"] = disposition
        with store_errors(self.url(params["Key"])):
            return str(self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=int(expires_s)))


def _chunks(body: Any, chunk_size: int, where: str) -> Iterator[bytes]:
    try:
        with store_errors(where):
            yield from body.iter_chunks(chunk_size)
    finally:
        body.close()
